"""The package's layers, read from its imports (module top and function bodies alike): no
import circle and no import that runs up the layers (a failure names the importing module and
what it imports: move the code down, or hand the thing down as an argument; the family is
resolved once by the commands, `dmdscale.families.resolve`); the DMD2 math imports without the
scaling stack; family names are compared nowhere outside the family registry."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from dmdscale.families import FAMILIES

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dmdscale"

# Bottom to top. A module may import its own subpackage and anything on a lower layer; the
# parts of one layer do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("dmdscale",),  # the package itself (its version)
    ("redact", "startup"),  # credentials and local paths out of everything written; start-up marks
    ("errors",),  # what a user can fix: one line
    ("config",),  # the typed config
    ("core",),  # the DMD2 math and the network interface it calls (core.networks)
    ("contracts",),  # what a family is to the layers that run it
    ("models",),  # one adapter per kind of teacher network
    ("data",),  # Ray Data sources, image and latent rows
    ("eval", "export", "tracking", "tools"),  # metrics, student folders, MLflow, planners and builders
    ("distributed",),  # Ray Train workers, DeepSpeed engines, actor pools, checkpoints
    ("families",),  # one per teacher family, using everything below
    ("driver", "evaluate", "memory"),  # the run, the evaluate command and the memory planner command
    ("sweep",),  # runs many runs
    ("cli",),
    ("__main__",),
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The dmdscale modules `name` imports, wherever in the file the import is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("dmdscale") and target != name:
                out.add(target)
    return out


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "dmdscale"


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer():
    unplaced = sorted({layer(m) for m in modules()} - set(RANK))
    assert not unplaced, f"place {unplaced} in LAYERS"


def test_no_import_runs_up_the_layers():
    upward = sorted(f"{a} imports {b}" for a, targets in graph().items() for b in targets
                    if layer(a) != layer(b) and RANK[layer(b)] >= RANK[layer(a)])
    assert not upward, "imports up (or across) the layers:\n" + "\n".join(upward)


def test_no_import_circle():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_reader_sees_imports_in_function_bodies_and_relative_ones(tmp_path):
    """The checks above would pass vacuously if the reader missed what they must catch."""
    (tmp_path / "m.py").write_text("def f():\n    from dmdscale.families import resolve\n    from . import sibling\n")
    known = {"dmdscale.families": Path(), "dmdscale.core.m": tmp_path / "m.py", "dmdscale.core.sibling": Path()}
    assert imports("dmdscale.core.m", tmp_path / "m.py", known) == {"dmdscale.families", "dmdscale.core.sibling"}


def test_core_imports_without_ray_deepspeed_or_mlflow():
    """dmdscale.core with ray, deepspeed and mlflow made unimportable: the math needs none."""
    code = """
import importlib, pkgutil, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "deepspeed", "mlflow"):
            raise ImportError(f"{name} is not available here")
sys.meta_path.insert(0, Refuse())
import dmdscale.core
for info in pkgutil.iter_modules(dmdscale.core.__path__):
    importlib.import_module(f"dmdscale.core.{info.name}")
print(sorted(m for m in sys.modules if m.split(".")[0] in ("ray", "deepspeed", "mlflow")))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def family_comparisons(text: str) -> list[str]:
    """Lines comparing something to a registered family's name: `== "sd15"`, `in ("unet2d", ...)`."""
    names = "|".join(map(re.escape, FAMILIES))
    literal = rf"""["']({names})["']"""
    pattern = re.compile(rf"(==|!=)\s*{literal}|{literal}\s*(==|!=)|\bin\s*[(\[{{][^)\]}}]*{literal}")
    return [line.strip() for line in text.splitlines() if pattern.search(line)]


def test_family_comparison_detector_finds_the_usual_forms():
    assert family_comparisons('if cfg.model.family == "sdxl":') and family_comparisons("x in ('sd15', 'sdxl')")
    assert family_comparisons('"unet2d" != family') and not family_comparisons('name = "toy2d"')


def test_no_family_string_comparison_outside_the_registry():
    found = {str(path.relative_to(ROOT)): hits for path in PACKAGE.rglob("*.py")
             if path.parent != PACKAGE / "families" and (hits := family_comparisons(path.read_text()))}
    assert not found, f"compare families through dmdscale.families, not by name: {found}"
