"""Sweep a pipeline's config with Ray Tune (default search space: the GAN weights, the update
ratio and the learning rate), one MLflow run per trial under the sweep's run.

    python pipelines/sweep.py --out runs/sweep [--quick] [--config FILE] [key=value ...]

DIR gets results.csv, best_config.yaml (run it with the family's pipeline) and sweep.png;
run the same command again to resume an interrupted sweep.
"""
from pathlib import Path

from dmdscale import cli, sweep

if __name__ == "__main__":
    cli.main(sweep.run, None, Path(__file__).parent / "configs" / "digits.yaml", __doc__)
