"""Distil a SD1.5 teacher (a diffusers pipeline folder or hub id) into a few-step student.

    python pipelines/sd15.py --out runs/sd15 [--quick] [--config FILE] [key=value ...]
    ray job submit --working-dir . -- python pipelines/sd15.py --out runs/sd15 data.path=...
"""
from pathlib import Path

from dmdscale import cli, text2img

if __name__ == "__main__":
    cli.main(text2img.run, None, Path(__file__).parent / "configs" / "sd15.yaml", __doc__)
