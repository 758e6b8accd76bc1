"""Distil an SD3 (SD3.5) flow-matching teacher (a diffusers pipeline folder or hub id) into a few-step student.

    python pipelines/sd3.py --out runs/sd3 [--quick] [--config FILE] [key=value ...]
    ray job submit --working-dir . -- python pipelines/sd3.py --out runs/sd3 data.path=...
"""
from pathlib import Path

from dmdscale import cli
from dmdscale.driver import run

if __name__ == "__main__":
    cli.main(run, None, Path(__file__).parent / "configs" / "sd3.yaml", __doc__, family="sd3")
