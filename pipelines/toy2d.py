"""Distil the analytic 8-Gaussian teacher into a 1-4 step generator.

    python pipelines/toy2d.py --out runs/toy2d [--quick] [--config FILE] [key=value ...]
"""
from pathlib import Path

from dmdscale import cli
from dmdscale.driver import run

if __name__ == "__main__":
    cli.main(run, None, Path(__file__).parent / "configs" / "toy2d.yaml", __doc__, family="toy2d")
