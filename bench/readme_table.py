"""Rewrite one benchmark's table between its markers in bench/README.md."""
from pathlib import Path

README = Path(__file__).resolve().parent / "README.md"


def update_readme_table(name: str, table: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = README.read_text()
    if start not in text:
        text += f"\n{start}\n{end}\n"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    README.write_text(f"{head}{start}\n{table}\n{end}{tail}")
