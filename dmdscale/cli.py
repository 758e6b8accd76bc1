"""The command line every entry point shares: --config FILE, --out DIR, --quick, --debug, key=value ...

`python -m dmdscale --config FILE` runs any family; `pipelines/<family>.py` are the same call
with the family's config as default, and refuse a config of another family.

Expected failures (`dmdscale.errors.UserError`: a bad config value, data file, teacher, tracking
server, cluster size) print one line naming the cause and exit 2; Ctrl-C exits 130 with how to
resume. `--debug` (or DMDSCALE_DEBUG=1) shows their tracebacks; unexpected errors always keep theirs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

from dmdscale.config import Config, ConfigError, load_config
from dmdscale.errors import user_error_in
from dmdscale.families import resolve
from dmdscale.redact import redact

DEBUG_ENV = "DMDSCALE_DEBUG"


def parse(argv: list[str], default_config: str | Path | None, description: str,
          family: str | None = None) -> tuple[Config, Path]:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # main() looks for --debug itself
    parser.add_argument("--config", default=None if default_config is None else str(default_config),
                        required=default_config is None, help="YAML config file")
    parser.add_argument("--out", default=None, help="output directory (default: runs/<config file name>)")
    parser.add_argument("--quick", action="store_true", help="reduced configuration for smoke tests")
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of expected errors too (or set {DEBUG_ENV}=1)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. train.max_steps=100 loss.gan_generator_weight=0.003")
    # Intermixed: overrides may come before, between and after the options.
    args = parser.parse_intermixed_args(argv)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    if out.exists() and not out.is_dir():
        parser.exit(2, f"{parser.prog}: error: --out: {out} is a file, not a folder; give a folder for the run\n")
    try:
        cfg = load_config(args.config, args.overrides, quick=args.quick)
        resolve(cfg)  # the keys that depend on the family, before anything else
        if family is not None and cfg.model.family != family:
            raise ConfigError(f"model.family: {parser.prog} distils {family} teachers, but {args.config} "
                              f"(with its overrides) says {cfg.model.family!r}; run that config with "
                              f"python -m dmdscale --config {args.config}")
    except ConfigError as exc:
        if args.debug or os.environ.get(DEBUG_ENV):
            raise
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file on the way, no permission
        parser.exit(2, f"{parser.prog}: error: --out: cannot make the folder {out} ({exc.strerror})\n")
    return cfg, out


def main(run: Callable[[Config, Path], Any], argv: list[str] | None, default_config: str | Path | None,
         description: str, family: str | None = None) -> None:
    """Parse the command line and call `run(cfg, out)`; `family`: the one the script is for."""
    argv = argv if argv is not None else sys.argv[1:]
    cfg, out = parse(argv, default_config, description, family)
    debug = "--debug" in argv or bool(os.environ.get(DEBUG_ENV))
    prog = Path(sys.argv[0]).name
    try:
        run(cfg, out)
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{prog}: interrupted; the same command resumes from the latest checkpoint\n")
        sys.exit(130)
    except Exception as exc:
        cause = user_error_in(exc)
        if cause is None or debug:
            raise
        sys.stderr.write(f"{prog}: error: {redact(str(cause))}\n(the traceback: rerun with --debug)\n")
        sys.exit(2)
