"""Distil an SDXL teacher (a diffusers pipeline folder or hub id) into a few-step student.

    python pipelines/sdxl.py --out runs/sdxl [--quick] [--config FILE] [key=value ...]
    ray job submit --working-dir . -- python pipelines/sdxl.py --out runs/sdxl data.path=...
"""
from pathlib import Path

from dmdscale import cli
from dmdscale.driver import run

if __name__ == "__main__":
    cli.main(run, None, Path(__file__).parent / "configs" / "sdxl.yaml", __doc__, family="sdxl")
