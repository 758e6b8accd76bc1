"""Distil a FLUX.1 flow-matching teacher (a diffusers pipeline folder or hub id) into a few-step student.

    python pipelines/flux.py --out runs/flux [--quick] [--config FILE] [key=value ...]
    ray job submit --working-dir . -- python pipelines/flux.py --out runs/flux data.path=...
"""
from pathlib import Path

from dmdscale import cli
from dmdscale.driver import run

if __name__ == "__main__":
    cli.main(run, None, Path(__file__).parent / "configs" / "flux.yaml", __doc__, family="flux")
