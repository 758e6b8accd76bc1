"""Distil a Qwen-Image teacher (a diffusers pipeline folder or hub id) into a few-step student.

    python pipelines/qwenimage.py --out runs/qwenimage [--quick] [--config FILE] [key=value ...]
    ray job submit --working-dir . -- python pipelines/qwenimage.py --out runs/qwenimage data.path=...
"""
from pathlib import Path

from dmdscale import cli
from dmdscale.driver import run

if __name__ == "__main__":
    cli.main(run, None, Path(__file__).parent / "configs" / "qwenimage.yaml", __doc__, family="qwenimage")
