"""The documentation: the configuration reference is generated from dmdscale/config.py, every
relative Markdown link points at something that exists, and README.md stays short."""
from __future__ import annotations

import re
from pathlib import Path

from dmdscale.tools import config_reference

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "configuration.md"
README_MAX_LINES = 250


def linked_docs() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md")),
            *sorted((ROOT / "dmdscale" / "families").glob("*/README.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation (backticks too) dropped, spaces to
    hyphens; underscores stay."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code:
            continue
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    """Every Markdown link target in `path`, outside code blocks and code spans."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_the_configuration_reference_is_generated_from_the_config():
    expected = config_reference.render()
    actual = REFERENCE.read_text() if REFERENCE.is_file() else ""
    assert actual == expected, ("docs/configuration.md does not match dmdscale/config.py: run `make docs` "
                                "(python -m dmdscale.tools.config_reference > docs/configuration.md)")


def test_every_key_in_the_reference_has_a_type_default_and_description():
    rows = config_reference.rows()
    assert len({r.key for r in rows}) == len(rows)
    for r in rows:
        assert r.type and r.default, r
        assert len(r.description) >= 10, f"{r.key}: give its field a docstring in dmdscale/config.py"


def test_model_family_lists_every_registered_family():
    from dmdscale.families import FAMILIES

    (row,) = [r for r in config_reference.rows() if r.key == "model.family"]
    missing = [name for name in FAMILIES if name not in row.description]
    assert not missing, f"model.family's docstring in dmdscale/config.py does not name {missing}"


def test_relative_links_point_at_files_that_exist():
    broken = []
    for doc in linked_docs():
        for target in links(doc):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("mailto:"):
                continue  # http(s) and other absolute URLs
            path_part, _, anchor = target.partition("#")
            dest = (doc.parent / path_part).resolve() if path_part else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no {path_part})")
            elif anchor and dest.is_file() and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no heading #{anchor} in {path_part or doc.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_slugs_follow_github():
    assert slug("Stages (`train.init`)") == "stages-traininit"
    assert slug("How many 80 GB GPUs for SD3.5-Large and FLUX.1-dev?") == "how-many-80-gb-gpus-for-sd35-large-and-flux1-dev"
    assert slug("Ray's token file") == "rays-token-file"
    assert slug("digits ablations (`bench/digits_ablations.py`)") == "digits-ablations-benchdigits_ablationspy"
    assert slug("digits: metrics.json") == "digits-metricsjson"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; keep it to {README_MAX_LINES} and move detail to docs/"
