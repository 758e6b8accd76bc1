"""Distil a SD1.5 teacher (a diffusers pipeline folder or hub id) into a few-step student.

    python pipelines/sd15.py --out runs/sd15 [--quick] [--config FILE] [key=value ...]
    ray job submit --working-dir . -- python pipelines/sd15.py --out runs/sd15 data.path=...
"""
from pathlib import Path

from dmdscale import cli
from dmdscale.driver import run

if __name__ == "__main__":
    cli.main(run, None, Path(__file__).parent / "configs" / "sd15.yaml", __doc__, family="sd15")
