"""Distil a class-conditional digits teacher into a 1-4 step generator on Ray Train + DeepSpeed.

    python pipelines/digits.py --out runs/digits [--quick] [--config FILE] [key=value ...]
"""
from pathlib import Path

from dmdscale import cli
from dmdscale.driver import run

if __name__ == "__main__":
    cli.main(run, None, Path(__file__).parent / "configs" / "digits.yaml", __doc__, family="unet2d")
