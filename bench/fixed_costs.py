"""Fixed costs of the distributed layer, each measured in one run on one machine (issue 36):

F1  time from command start to the first training step of `pipelines/digits.py --quick`, split by
    phase (metrics.json's startup_*_s, `dmdscale.startup`): cold (an empty cache_dir: the digits
    data, the classifier and the teacher are built) and warm (the same cache_dir again), and each
    run's whole wall time.
F2  per-iteration wall time of the same `DMD2Step` in a plain loop (torch AdamW, batches in
    memory), under DeepSpeed ZeRO-2 in one process, and through Ray Train + Ray Data (1 worker,
    ZeRO-2): on the tiny UNet of the quick config (where fixed costs dominate) and at digits size;
    the overhead per step in ms against the plain loop.

    python bench/fixed_costs.py [--steps N] [--skip-startup | --startup-only] [--baseline OTHER_CHECKOUT]

Writes bench/results/fixed_costs.json and rewrites its table in bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from digits_throughput import plain_loop_images_per_s
from readme_table import update_readme_table

from dmdscale.config import load_config
from dmdscale.families import resolve
from dmdscale.startup import PHASES
from dmdscale.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pipelines" / "configs" / "digits.yaml"
RESULTS = ROOT / "bench" / "results" / "fixed_costs.json"
BEFORE = ROOT / "bench" / "results" / "fixed_costs_before.json"  # the baseline the table compares with


def quick_run(cache_dir: Path, out: Path, root: Path = ROOT) -> dict:
    """`pipelines/digits.py --quick` as a user runs it, from the checkout at `root` (another one:
    its package first on the path, for a before/after in one session); its start-up figures and
    wall time."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out.parent / 'mlflow.db'}"}
    if root != ROOT:
        env["PYTHONPATH"] = str(root)
    t0 = time.time()
    subprocess.run([sys.executable, str(root / "pipelines" / "digits.py"), "--quick", "--out", str(out),
                    f"cache_dir={cache_dir}"], check=True, env=env, cwd=root,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_seconds": wall, **{p: metrics.get(f"startup_{p}_s") for p in PHASES}}


def per_iteration(overrides: dict, steps: int) -> dict:
    """ms per iteration: plain loop, DeepSpeed in one process, Ray Train + Ray Data."""
    cfg = load_config(CONFIG, {"train.max_steps": steps, "train.checkpoint_every": 10**6, "train.log_every": 10,
                               "eval.during_training": False, "loss.regression_weight": 0.0,
                               "export.choose": "fixed", **overrides})
    family = resolve(cfg)
    inputs = family.prepare(cfg, family.preflight(cfg))
    (images, labels), teacher_path = inputs.train, Path(inputs.teacher_path)
    b = cfg.train.batch_size
    plain = plain_loop_images_per_s(cfg, teacher_path, images, labels)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        with Tracker("bench", params=cfg.flat()) as tracker:
            ray_ips = family.fit(cfg, inputs, Path(tmp) / "run", tracker).metrics["train_images_per_s"]
    # Last: it initialises torch.distributed in this process, which Ray workers must not inherit.
    in_process = plain_loop_images_per_s(cfg, teacher_path, images, labels, deepspeed=True)
    ms = {"plain": 1000 * b / plain["images_per_s"], "deepspeed": 1000 * b / in_process["images_per_s"],
          "ray": 1000 * b / ray_ips}
    return {"batch": b, "width": cfg.teacher_training.width, "resolution": cfg.data.resolution,
            "ms_per_iteration": ms, "overhead_ms": {"deepspeed": ms["deepspeed"] - ms["plain"],
                                                    "ray": ms["ray"] - ms["plain"]},
            "ray_over_plain_images_per_s": ms["plain"] / ms["ray"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip-startup", action="store_true", help="only F2")
    parser.add_argument("--startup-only", action="store_true", help="only F1 (the table keeps the last F2)")
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. `git worktree add /tmp/before "
                        "HEAD~1`): F1 warm with its code too, on the same cache, in the same session")
    args = parser.parse_args()
    results: dict = {"bench": "fixed_costs", "device": f"cpu ({platform.processor() or platform.machine()}, "
                                                       f"{os.cpu_count()} cores)", "torch": torch.__version__,
                     "steps": args.steps}
    last = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if not args.skip_startup:
        with tempfile.TemporaryDirectory() as tmp:
            cold = quick_run(Path(tmp) / "cache", Path(tmp) / "cold")
            warm = quick_run(Path(tmp) / "cache", Path(tmp) / "warm")
            results["F1_quick_digits"] = {"cold": cold, "warm": warm}
            if args.baseline is not None:
                commit = subprocess.run(["git", "-C", str(args.baseline), "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True).stdout.strip()
                results["F1_quick_digits"]["warm_baseline"] = {
                    "commit": commit, **quick_run(Path(tmp) / "cache", Path(tmp) / "baseline", args.baseline.resolve())}
        RESULTS.write_text(json.dumps(results, indent=2))  # kept should a later part fail
    if args.startup_only:
        results |= {k: v for k, v in last.items() if k.startswith("F2")}
    else:
        run_per_iteration(results, args.steps)
    RESULTS.write_text(json.dumps(results, indent=2))
    write_table(results)
    print(json.dumps(results, indent=2))


def run_per_iteration(results: dict, steps: int) -> None:
    quick_cfg = load_config(CONFIG, quick=True)
    tiny = {"teacher_training.width": quick_cfg.teacher_training.width,
            "teacher_training.steps": quick_cfg.teacher_training.steps, "train.batch_size": quick_cfg.train.batch_size}
    results["F2_tiny"] = per_iteration(tiny, steps)
    RESULTS.write_text(json.dumps(results, indent=2))
    results["F2_digits"] = per_iteration({}, steps)


def write_table(results: dict) -> None:
    rows = ["| measure | tiny UNet (quick) | digits size |", "|---|---|---|"]
    t, d = results["F2_tiny"], results["F2_digits"]
    for name, key in (("plain loop", "plain"), ("DeepSpeed ZeRO-2, one process", "deepspeed"),
                      ("Ray Train + Ray Data, 1 worker, ZeRO-2", "ray")):
        rows.append(f"| F2 {name}, ms/iteration | {t['ms_per_iteration'][key]:.0f} | "
                    f"{d['ms_per_iteration'][key]:.0f} |")
    rows.append(f"| F2 Ray overhead per step vs plain, ms | {t['overhead_ms']['ray']:.0f} | "
                f"{d['overhead_ms']['ray']:.0f} |")
    rows.append(f"| F2 Ray / plain, images/s | {t['ray_over_plain_images_per_s']:.2f} | "
                f"{d['ray_over_plain_images_per_s']:.2f} |")
    table = "\n".join(rows)
    if "F1_quick_digits" in results:
        f1 = results["F1_quick_digits"]
        # The code before: run in this session (--baseline), else as fixed_costs_before.json keeps it.
        before, label = f1.get("warm_baseline"), f"warm, {f1.get('warm_baseline', {}).get('commit')} (same session)"
        if before is None and BEFORE.is_file():
            before, label = json.loads(BEFORE.read_text())["F1_quick_digits"]["warm"], "warm, before"
        head = "| `--quick` digits, phase ended at (s since command start) | cold cache | warm cache |"
        phases = [head + (f" {label} |" if before else ""), "|---|---|---|" + ("---|" if before else "")]
        for phase in (*PHASES, "wall_seconds"):
            name = "whole command" if phase == "wall_seconds" else phase
            row = f"| {name} | {f1['cold'][phase] or 0:.1f} | {f1['warm'][phase] or 0:.1f} |"
            phases.append(row + (f" {before[phase] or 0:.1f} |" if before else ""))
        table = "\n".join(phases) + "\n\n" + table
    update_readme_table("fixed_costs", table)


if __name__ == "__main__":
    main()
