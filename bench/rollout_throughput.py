"""Backward simulation on a rollout actor vs inline, for a 4-step student.

A multi-step student spends up to 3 generator forwards per iteration simulating its own input
(on average 1.5 with k uniform in 0..3). With `rollout.mode: actors` that work moves to Ray
actors that simulate a few iterations ahead. This measures generator updates/s and
iterations/s of a plain-process DMD2Step (TorchOptimizedModule) on a tiny class-conditional
UNet, inline and with one rollout actor (max_staleness 1), same seeds and batches.

    python bench/rollout_throughput.py [--steps N]

On a CPU box the actor shares the cores with the trainer, so the ratio says how much of the
simulation overlaps with training rather than how much it would gain beside a GPU trainer.
Anything else running on the machine skews the two runs differently: the 1-minute load
average before and after each run is recorded with the figures.
Writes bench/results/rollout_throughput.json.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import tempfile
import time
from pathlib import Path

import ray
import torch
from diffusers import UNet2DModel
from readme_table import update_readme_table

from dmdscale.config import build_config
from dmdscale.core.loop import train_loop
from dmdscale.core.optim import TorchOptimizedModule
from dmdscale.core.step import Batch, DMD2Step
from dmdscale.distributed.resources import cpu_threads
from dmdscale.distributed.rollouts import RolloutPool
from dmdscale.core.networks import Critic
from dmdscale.models.heads import ConvHead
from dmdscale.families.unet2d.model import load_unet, tiny_unet_config
from dmdscale.families.unet2d.teacher import ddpm_scheduler, save_teacher

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION, CLASSES, WIDTH = 16, 10, 16


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return f"{model} (CPU, {len(os.sched_getaffinity(0))} cores)"


def make_teacher(folder: Path) -> Path:
    """A randomly initialised tiny UNet saved as a diffusers folder: throughput only."""
    torch.manual_seed(0)
    save_teacher(UNet2DModel(**tiny_unet_config(RESOLUTION, 1, CLASSES, width=WIDTH)), ddpm_scheduler(), folder)
    return folder


def make_step(cfg, teacher_path: Path, device: torch.device) -> tuple[DMD2Step, torch.nn.Module]:
    """The training players as dmdscale.distributed.worker builds them: generator and fake score copy the teacher."""
    teacher = load_unet(teacher_path).to(device)
    generator = copy.deepcopy(teacher).train().requires_grad_(True)
    fake_score = copy.deepcopy(teacher).train().requires_grad_(True)
    critic = Critic(fake_score, ConvHead.for_model(fake_score)).to(device)
    step = DMD2Step(cfg, teacher, TorchOptimizedModule(generator, cfg.train, role="generator"),
                    TorchOptimizedModule(critic, cfg.train, role="critic"), device=device)
    return step, generator


def batches(cfg, device: torch.device):
    """Synthetic digits-shaped batches, drawn ahead so data costs nothing in the timing."""
    g = torch.Generator().manual_seed(1)
    b = cfg.train.batch_size
    pool = [Batch((torch.rand(b, 1, RESOLUTION, RESOLUTION, generator=g) * 2 - 1).to(device),
                  torch.randint(CLASSES, (b,), generator=g).to(device)) for _ in range(8)]
    i = 0
    while True:
        yield pool[i % len(pool)]
        i += 1


def load_average() -> float:
    """1-minute load: the cores are shared, so a busy machine shows up next to the figures."""
    return os.getloadavg()[0]


def run(cfg, teacher_path: Path, device: torch.device, mode: str, trainer_threads: int | None) -> dict:
    load_before = load_average()
    # As a Ray Train worker sets them: all cores inline, the cores the actors leave with actors.
    torch.set_num_threads(trainer_threads or cpu_threads(cfg, 1))
    step, generator = make_step(cfg, teacher_path, device)
    source, pool, on_step_end = batches(cfg, device), None, None
    if mode == "actors":
        pool = RolloutPool.create(cfg, functools.partial(load_unet, str(teacher_path)), 0, 1, device)
        ray.get([a.loaded_version.remote() for a in pool.actors])  # actor start-up is not throughput
        pool.start(0, generator.state_dict)
        source = pool.attach(source, 0)
        on_step_end = lambda metrics, s: pool.after_step(s, generator.state_dict)  # noqa: E731
    try:
        result = train_loop(step, source, cfg.train.max_steps, on_step_end=on_step_end, progress=False)
        stats = pool.stats() if pool is not None else {}
    finally:
        if pool is not None:
            pool.close()
    updates = sum(m["generator_updated"] for m in result.history)
    return {"generator_updates_per_s": updates / result.seconds,
            "iterations_per_s": len(result.history) / result.seconds,
            "seconds": result.seconds, "generator_updates": updates,
            "wait_for_input_seconds": result.data_wait_seconds, "pool": stats,
            "trainer_threads": torch.get_num_threads(),
            "load_average_before": load_before, "load_average_after": load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--trainer-threads", type=int, default=None,
                        help="torch threads of the trainer (default: as dmdscale.distributed.worker.cpu_threads sets them)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = {"train.max_steps": args.steps, "train.batch_size": args.batch, "train.ttur_ratio": 5,
                "train.warmup_steps": 0, "generator.timesteps": [999, 749, 499, 249],
                "rollout.num_actors": 1, "rollout.max_staleness": 1, "rollout.publish_every": 1,
                "rollout.lookahead": 2, "rollout.actor_cpus": 0.5, "scale.use_gpu": device.type == "cuda"}
    ray.init(num_cpus=2, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            teacher_path = make_teacher(Path(tmp) / "teacher")
            inline, actors = (run(build_config({}, settings | {"rollout.mode": mode}), teacher_path, device, mode,
                                  args.trainer_threads) for mode in ("inline", "actors"))
    finally:
        ray.shutdown()
    results = {
        "bench": "rollout_throughput",
        "device": device_name(device), "torch": torch.__version__, "ray": ray.__version__,
        "model": f"tiny class-conditional UNet, width {WIDTH}, {RESOLUTION}x{RESOLUTION}x1, random init",
        "settings": settings,
        "inline": inline, "actors": actors,
        "ratio_generator_updates_per_s": actors["generator_updates_per_s"] / inline["generator_updates_per_s"],
        "ratio_iterations_per_s": actors["iterations_per_s"] / inline["iterations_per_s"],
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out = ROOT / "bench" / "results" / "rollout_throughput.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    rows = [f"| {name} | {r['trainer_threads']} | {r['generator_updates_per_s']:.3f} | {r['iterations_per_s']:.2f} | "
            f"{r['wait_for_input_seconds']:.1f} of {r['seconds']:.1f} |" for name, r in (("inline", inline), ("1 rollout actor", actors))]
    update_readme_table("rollout_throughput", "\n".join([
        "| backward simulation | trainer threads | generator updates/s | iterations/s | s waiting for input |",
        "|---|---|---|---|---|", *rows, "",
        f"actors / inline: **{results['ratio_generator_updates_per_s']:.2f}** "
        f"(dropped stale: {actors['pool'].get('dropped_stale')}, mean staleness {actors['pool'].get('mean_staleness', 0):.2f}). "
        f"Device: {results['device']}."]))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
