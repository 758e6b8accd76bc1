"""The command line every entry point shares: --config FILE, --out DIR, --quick, key=value ...

`python -m dmdscale --config FILE` runs any family; `pipelines/<family>.py` are the same call
with the family's config as default, and refuse a config of another family.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from dmdscale.config import Config, ConfigError, load_config


def parse(argv: list[str], default_config: str | Path | None, description: str,
          family: str | None = None) -> tuple[Config, Path]:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None if default_config is None else str(default_config),
                        required=default_config is None, help="YAML config file")
    parser.add_argument("--out", default=None, help="output directory (default: runs/<config file name>)")
    parser.add_argument("--quick", action="store_true", help="reduced configuration for smoke tests")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.max_steps=100 loss.gan_generator_weight=0.003")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, quick=args.quick)
        if family is not None and cfg.model.family != family:
            raise ConfigError(f"model.family: {parser.prog} distils {family} teachers, but {args.config} "
                              f"(with its overrides) says {cfg.model.family!r}; run that config with "
                              f"python -m dmdscale --config {args.config}")
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    out.mkdir(parents=True, exist_ok=True)
    return cfg, out


def main(run: Callable[[Config, Path], Any], argv: list[str] | None, default_config: str | Path | None,
         description: str, family: str | None = None) -> None:
    """Parse the command line and call `run(cfg, out)`; `family`: the one the script is for."""
    cfg, out = parse(argv if argv is not None else sys.argv[1:], default_config, description, family)
    try:
        run(cfg, out)
    except ConfigError as exc:  # found by the run's own checks (e.g. an unfinished run's config)
        sys.exit(f"{Path(sys.argv[0]).name}: error: {exc}")
