"""The command line every pipeline shares: --config FILE, --out DIR, --quick, key=value ..."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dmdscale.config import Config, ConfigError, load_config


def parse(argv: list[str] | None, default_config: str | Path, description: str) -> tuple[Config, Path]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=str(default_config), help="YAML config file")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--quick", action="store_true", help="reduced configuration for smoke tests")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.max_steps=100 loss.gan_generator_weight=0.003")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, quick=args.quick)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return cfg, out


def main(run, argv: list[str] | None, default_config: str | Path, description: str) -> None:
    cfg, out = parse(argv if argv is not None else sys.argv[1:], default_config, description)
    try:
        run(cfg, out)
    except ConfigError as exc:  # found by the run's own checks (e.g. an unfinished run's config)
        sys.exit(f"{Path(sys.argv[0]).name}: error: {exc}")
