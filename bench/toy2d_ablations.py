"""toy2d ablations in one run, same seed and iteration budget for each variant:
TTUR ratio 1 vs 5, GAN on vs off, 4-step student with vs without backward simulation.

    python bench/toy2d_ablations.py [--steps N] [--seeds 0 1]
    python bench/toy2d_ablations.py --explore loss.gan_max_step=0 ...   # one ad-hoc variant
    python bench/toy2d_ablations.py --explore --then generator.timesteps=[999,749,499,249] train.lr=2e-4
                                        # a second stage from the first's generator and critic

Writes bench/results/toy2d_ablations.json and rewrites the table between the markers in
bench/README.md; `--explore` appends to bench/results/toy2d_explore.jsonl (the tuning behind
toy2d.yaml's comments).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from readme_table import update_readme_table

from dmdscale.config import load_config
from dmdscale.core.loop import train_loop
from dmdscale.core.sampling import sample
from dmdscale.families import toy2d

ROOT = Path(__file__).resolve().parents[1]
FOUR = [999, 749, 499, 249]
# GAN weights: w_g puts the GAN gradient on x at ~0.4x the DM gradient (measured ratio 2.4
# at 1000 steps), the authors' way of choosing it; w_d keeps the critic's loss fake-score led.
GAN = {"loss.gan_generator_weight": 1.0, "loss.gan_critic_weight": 0.1}
VARIANTS = {
    "1-step, TTUR 5 (default)": {},
    "1-step, TTUR 1": {"train.ttur_ratio": 1},
    "1-step, TTUR 5, GAN": GAN,
    "4-step, backward simulation": {"generator.timesteps": FOUR},
    "4-step, noised real inputs": {"generator.timesteps": FOUR, "generator.backward_simulation": False},
}
COLUMNS = ["energy_distance_student", "in_mode_fraction_student", "mode_share_min_student",
           "mode_share_max_student", "train_seconds"]


def run_one(overrides: dict, steps: int | None, seed: int, then: dict | None = None) -> dict:
    """One run; with `then`, a second stage (those overrides on top) continues from the first's
    generator and critic with fresh optimizers, and the first stage is evaluated too."""
    extra = {"train.max_steps": steps} if steps else {}
    cfg = load_config(ROOT / "pipelines" / "configs" / "toy2d.yaml", {**overrides, **extra, "train.seed": seed})
    t0 = time.perf_counter()
    toy, _ = toy2d.train(cfg, progress=False)
    out = {}
    if then is not None:
        out["stage0"] = {k: v for k, v in toy.evaluate(seed=1234 + seed)[0].items() if k in COLUMNS}
        toy.cfg = cfg = load_config(ROOT / "pipelines" / "configs" / "toy2d.yaml",
                                    {**overrides, **extra, **then, "train.seed": seed})
        train_loop(toy.step_fn(), toy.batches(cfg.train.batch_size, cfg.train.seed + 1), cfg.train.max_steps,
                   log_every=cfg.train.log_every, progress=False)
    train_s = time.perf_counter() - t0
    metrics, _ = toy.evaluate(seed=1234 + seed)
    return {**metrics, **out, "per_step": per_step(toy, seed), "train_seconds": train_s}


@torch.no_grad()
def per_step(toy: toy2d.Toy2D, seed: int) -> dict[str, float]:
    """A multi-step student's in-mode share after each of its steps (what each step adds)."""
    rng = torch.Generator().manual_seed(1234 + seed)
    n = toy.cfg.eval.num_samples
    noise = torch.randn(n, 2, generator=rng)
    timesteps = toy.cfg.generator.timesteps
    out = {}
    for i in range(len(timesteps)):
        points = sample(toy.generator, toy.schedule, noise, timesteps[:i + 1], rng=torch.Generator().manual_seed(seed))
        out[f"in_mode_after_step_{i + 1}"] = float(toy.mixture.mode_shares(points).sum())
    return out


def run(steps: int | None, seeds: list[int]) -> dict:
    """Each variant at every seed; the figures are the means, `spread` half their range."""
    results = {}
    for name, overrides in VARIANTS.items():
        runs = [run_one(overrides, steps, seed) for seed in seeds]
        # Figures only: the per-step shares (a dict per run) stay in `runs`.
        mean = {k: sum(r[k] for r in runs) / len(runs) for k, v in runs[0].items() if isinstance(v, (int, float))}
        spread = {k: (max(r[k] for r in runs) - min(r[k] for r in runs)) / 2 for k in COLUMNS}
        results[name] = {"overrides": overrides, **mean, "spread": spread, "seeds": seeds, "runs": runs}
        print(name, {k: round(results[name][k], 4) for k in COLUMNS}, flush=True)
    return results


def table(results: dict) -> str:
    teacher = next(iter(results.values()))
    lines = ["| variant | energy distance | in mode | min mode share | max mode share | train s |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['energy_distance_student']:.4f} | {r['in_mode_fraction_student']:.3f} "
                     f"± {r['spread']['in_mode_fraction_student']:.3f} | "
                     f"{r['mode_share_min_student']:.3f} | {r['mode_share_max_student']:.3f} | "
                     f"{r['train_seconds']:.0f} |")
    lines.append(f"| teacher, {teacher['teacher_steps']} DDIM steps | {teacher['energy_distance_teacher']:.4f} | "
                 f"{teacher['in_mode_fraction_teacher']:.3f} | {teacher['mode_share_min_teacher']:.3f} | "
                 f"{teacher['mode_share_max_teacher']:.3f} | - |")
    lines.append(f"| data vs data (noise floor) | {teacher['energy_distance_data']:.4f} | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=None, help="iterations per variant (default: the config's)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--explore", nargs="*", default=None, help="one ad-hoc variant: dotted key=value overrides")
    parser.add_argument("--then", nargs="*", default=None, help="with --explore: a second stage's overrides")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.explore is not None:
        from dmdscale.config import parse_override

        overrides = dict(map(parse_override, args.explore))
        then = dict(map(parse_override, args.then)) if args.then is not None else None
        for seed in args.seeds:
            r = run_one(overrides, args.steps, seed, then)
            line = {"overrides": overrides, "then": then, "steps": args.steps, "seed": seed,
                    **{k: v for k, v in r.items() if k in COLUMNS + ["stage0", "per_step"]}}
            with open(ROOT / "bench" / "results" / "toy2d_explore.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            print(line, flush=True)
        return
    results = run(args.steps, args.seeds)
    payload = {"bench": "toy2d_ablations", "device": f"cpu ({platform.processor() or platform.machine()}, "
               f"{torch.get_num_threads()} threads)", "torch": torch.__version__, "results": results}
    out = ROOT / "bench" / "results" / "toy2d_ablations.json"
    out.write_text(json.dumps(payload, indent=2))
    update_readme_table("toy2d_ablations", table(results))
    print(table(results))


if __name__ == "__main__":
    main()
