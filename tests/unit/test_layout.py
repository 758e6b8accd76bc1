"""The package's layers: the DMD2 math imports without the scaling stack, and family names are
compared nowhere outside the family registry."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from dmdscale.families import FAMILIES

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dmdscale"


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
