"""digits benchmarks, each a ratio measured in one run on one machine:

P1  sampling speedup: the teacher's many-step DDIM sampler vs the 1-step student, same batch.
P2  DMD2 training throughput through Ray Train + Ray Data (1 worker, DeepSpeed ZeRO-2) divided
    by a plain single-process loop running the same step on in-memory batches (goal >= 0.90).
P3  share of steady-state step time the Ray workers wait on data (goal <= 5%).

    python bench/digits_throughput.py [--steps N] [--batch B]

Writes bench/results/digits_throughput.json and rewrites its table in bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from readme_table import update_readme_table

from dmdscale.config import load_config
from dmdscale.core.loop import train_loop
from dmdscale.core.optim import TorchOptimizedModule
from dmdscale.core.sampling import sample, teacher_sample
from dmdscale.core.step import Batch, DMD2Step
from dmdscale.distributed.worker import build_players
from dmdscale.families import resolve
from dmdscale.families.unet2d.model import load_unet
from dmdscale.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]


def plain_loop_images_per_s(cfg, teacher_path: Path, images: np.ndarray, labels: np.ndarray,
                            deepspeed: bool = False) -> dict:
    """The same DMD2 step in one process, batches already in memory: the ceiling for P2.
    With `deepspeed`, through the ZeRO engines the Ray workers use (splits P2's gap)."""
    torch.manual_seed(cfg.train.seed)
    teacher, generator, critic = build_players(cfg, resolve(cfg), str(teacher_path), torch.device("cpu"))
    if deepspeed:
        from dmdscale.distributed.engine import DeepSpeedOptimizedModule

        b = cfg.train.batch_size
        wrap = lambda m, role: DeepSpeedOptimizedModule(m, cfg.train, cfg.scale, b, role=role)  # noqa: E731
    else:
        wrap = lambda m, role: TorchOptimizedModule(m, cfg.train, role=role)  # noqa: E731
    step = DMD2Step(cfg, teacher, wrap(generator, "generator"), wrap(critic, "critic"))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(labels).long()
    b = cfg.train.batch_size
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            idx = torch.randint(len(x), (b,), generator=g)
            yield Batch(x[idx], y[idx])

    result = train_loop(step, batches(), cfg.train.max_steps, progress=False)
    return {"images_per_s": (len(result.history) - 1) * b / result.seconds, "seconds": result.seconds}


@torch.no_grad()
def sampling_speedup(cfg, teacher_path: Path, batch: int = 256) -> dict:
    model = load_unet(teacher_path)  # the student has the teacher's architecture
    r, c = cfg.data.resolution, cfg.data.channels
    z, y = torch.randn(batch, c, r, r), torch.arange(batch) % cfg.data.num_classes
    sample(model, model.schedule, z[:2], [999], y[:2])  # warm-up
    t0 = time.perf_counter()
    sample(model, model.schedule, z, [999], y)
    student_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    teacher_sample(model, z, cfg.eval.teacher_steps, y, cfg.loss.guidance_scale)
    teacher_s = time.perf_counter() - t0
    return {"teacher_seconds": teacher_s, "student_seconds": student_s, "speedup": teacher_s / student_s,
            "batch": batch, "teacher_steps": cfg.eval.teacher_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    cfg = load_config(ROOT / "pipelines" / "configs" / "digits.yaml",
                      {"train.max_steps": args.steps, "train.batch_size": args.batch,
                       "train.checkpoint_every": 10**6, "train.log_every": 10})
    family = resolve(cfg)
    inputs = family.prepare(cfg, family.preflight(cfg))
    (images, labels), teacher_path = inputs.train, Path(inputs.teacher_path)
    # Checkpoints are not evaluated here: the figure is training throughput alone.
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"during_training": False})})

    p1 = sampling_speedup(cfg, teacher_path)
    plain = plain_loop_images_per_s(cfg, teacher_path, images, labels)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        with Tracker("bench", params=cfg.flat()) as tracker:
            ray_metrics = family.fit(cfg, inputs, Path(tmp) / "run", tracker).metrics
    # Last: it initialises torch.distributed in this process, which Ray workers must not inherit.
    in_process_ds = plain_loop_images_per_s(cfg, teacher_path, images, labels, deepspeed=True)
    p2 = ray_metrics["train_images_per_s"] / plain["images_per_s"]
    results = {
        "bench": "digits_throughput",
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__, "steps": args.steps, "batch": args.batch,
        "P1_sampling_speedup": p1,
        "P2_ray_over_plain": p2,
        "plain_images_per_s": plain["images_per_s"],
        "deepspeed_in_process_images_per_s": in_process_ds["images_per_s"],
        "ray_images_per_s": ray_metrics["train_images_per_s"],
        "P3_data_wait_fraction": ray_metrics["data_wait_fraction"],
        "ray_first_batch_seconds": ray_metrics["data_first_batch_seconds"],
    }
    (ROOT / "bench" / "results" / "digits_throughput.json").write_text(json.dumps(results, indent=2))
    table = "\n".join([
        "| measure | value | goal |", "|---|---|---|",
        f"| P1 sampling speedup, {p1['teacher_steps']}-step teacher / 1-step student (batch {p1['batch']}) "
        f"| {p1['speedup']:.1f}x | - |",
        f"| P2 Ray Train + Ray Data (1 worker, ZeRO-2) / plain loop, images/s | {p2:.2f} "
        f"({ray_metrics['train_images_per_s']:.1f} / {plain['images_per_s']:.1f}) | >= 0.90 |",
        f"| of which: DeepSpeed ZeRO-2 in one process (no Ray) / plain loop | "
        f"{in_process_ds['images_per_s'] / plain['images_per_s']:.2f} ({in_process_ds['images_per_s']:.1f}) | - |",
        f"| P3 data wait share of step time (Ray workers, steady state) | "
        f"{100 * ray_metrics['data_wait_fraction']:.1f}% | <= 5% |",
    ])
    update_readme_table("digits_throughput", table)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
