"""DMD2 on Ray Train: the per-worker loop and the driver call that launches it.

Each worker loads the frozen teacher with `from_pretrained`, copies it into the generator and
the fake score (DMD2 starts both from the teacher), wraps generator and critic in DeepSpeed ZeRO
engines, and runs the plain `train_loop` over its Ray Data shard. Rank 0 logs to MLflow; every
rank reports to Ray Train at the same steps (reports are collective).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from dmdscale.config import Config, ScaleConfig
from dmdscale.loop import prefetched, train_loop
from dmdscale.models.base import Critic
from dmdscale.models.unet2d import ClassConditionalUNet, ConvHead, load_unet_teacher
from dmdscale.schedule import config_for
from dmdscale.step import Batch, DMD2Step

STUDENT_DIR = "student"


def build_players(teacher_path: str, device: torch.device) -> tuple[ClassConditionalUNet, ClassConditionalUNet, Critic]:
    """(frozen teacher, generator, critic) with generator and fake score copied from the teacher."""
    teacher = load_unet_teacher(teacher_path).to(device)
    generator = copy.deepcopy(teacher).train().requires_grad_(True)
    fake_score = copy.deepcopy(teacher).train().requires_grad_(True)
    return teacher, generator, Critic(fake_score, ConvHead.for_model(fake_score)).to(device)


def plan_resources(cfg: Config, cluster_cpus: float) -> dict[str, float]:
    """CPUs per train worker: leave `scale.data_cpus` to Ray Data so neither starves.

    On a 2-CPU machine with one worker: 1 CPU for the worker, 1 for data. A default plan
    (1 CPU per worker and 2 workers) leaves Ray Data 0 CPUs and deadlocks.
    """
    if cfg.scale.use_gpu:
        return {"CPU": 1.0, "GPU": 1.0}
    share = (cluster_cpus - cfg.scale.data_cpus) / cfg.scale.num_workers
    if share <= 0:
        raise ValueError(
            f"scale.num_workers={cfg.scale.num_workers} with scale.data_cpus={cfg.scale.data_cpus} "
            f"does not fit the cluster's {cluster_cpus:g} CPUs"
        )
    return {"CPU": min(1.0, share)}


def _batches(shard: Any, batch_size: int, device: torch.device, epochs: list[int],
             shuffle_buffer: int) -> Iterator[Batch]:
    """Endless batches from this worker's Ray Data shard, epoch after epoch, locally shuffled."""
    while True:
        for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                          local_shuffle_buffer_size=shuffle_buffer or None):
            yield Batch(b["image"], b.get("label"))
        epochs[0] += 1


def _cpu_threads(scale: ScaleConfig, local_workers: int) -> int:
    """Torch threads for a CPU worker: the config's, else this node's cores split among its
    workers. Ray's CPU reservation is for scheduling (so Ray Data keeps a CPU); decoding is
    light or done once (data.materialize), so the compute threads may use the whole node."""
    return scale.cpu_threads_per_worker or max(1, node_cores() // max(local_workers, 1))


def node_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _MLflowFromWorker:
    """Rank 0 logs step metrics into the driver's MLflow run (the URI travels in the config)."""

    def __init__(self, tracking_uri: str | None, run_id: str | None):
        self.client = None
        if tracking_uri and run_id:
            from mlflow import MlflowClient

            self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._safely(step, self.client.log_batch, self.run_id,
                     metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def grid(self, generator: ClassConditionalUNet, cfg: Config, step: int) -> None:
        """A 10 x num_classes grid from fixed noise, so grids over training are comparable."""
        if self.client is None:
            return
        from dmdscale.images import to_uint8
        from dmdscale.plots import save_grid
        from dmdscale.generator import sample

        n, c, r = 10 * cfg.data.num_classes, cfg.data.channels, cfg.data.resolution
        labels = torch.arange(n) // 10
        device = next(generator.parameters()).device
        noise = torch.randn((n, c, r, r), generator=torch.Generator().manual_seed(1234)).to(device)
        generator.eval()
        images = to_uint8(sample(generator, generator.schedule, noise, cfg.generator.timesteps, labels.to(device)))
        generator.train()
        with tempfile.TemporaryDirectory() as tmp:
            path = save_grid(images, labels.numpy(), Path(tmp) / f"samples_step{step:07d}.png",
                             title=f"step {step}")
            self._safely(step, self.client.log_artifact, self.run_id, str(path), "samples_over_training")

    @staticmethod
    def _safely(step: int, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # tracking must never stop training
            print(f"warning: MLflow logging failed at step {step}: {exc}")


def _all_ranks_agree(ok: bool) -> bool:
    """True only if every rank's flag is True (a skipped step must be skipped everywhere)."""
    if not torch.distributed.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def export_student(generator: ClassConditionalUNet, timesteps: list[int], out_dir: Path) -> Path:
    """The generator as a diffusers folder: unet/ + scheduler/ + dmdscale.json (its timesteps).

    The scheduler is diffusers' LCMScheduler, whose step is the student's sampler (x0 from the
    UNet's prediction, re-noised to the next timestep). With `original_inference_steps` 1000
    every timestep is on its grid, and `set_timesteps(timesteps=...)` reproduces
    `dmdscale.generator.sample` (its boundary scalings are ~1e-7 from pure x0 at t >= 249).
    """
    from diffusers import LCMScheduler

    out = Path(out_dir)
    generator.unet.save_pretrained(out / "unet")
    config = config_for(LCMScheduler, generator.schedule.scheduler_config) | {"original_inference_steps": 1000}
    LCMScheduler.from_config(config).save_pretrained(out / "scheduler")
    (out / "dmdscale.json").write_text(json.dumps({"timesteps": timesteps, "guidance_scale": 1.0}))
    return out


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point, run on every worker."""
    import ray.train
    import ray.train.torch

    from dmdscale.engine import DeepSpeedOptimizedModule

    cfg = Config.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(_cpu_threads(cfg.scale, ctx.get_local_world_size()))
    torch.manual_seed(cfg.train.seed)
    micro = cfg.train.batch_size // world
    teacher, generator, critic = build_players(config["teacher_path"], device)
    gen_engine = DeepSpeedOptimizedModule(generator, cfg.train, cfg.scale, micro)
    critic_engine = DeepSpeedOptimizedModule(critic, cfg.train, cfg.scale, micro)
    step_fn = DMD2Step(cfg, teacher, gen_engine, critic_engine, sync_flag=_all_ranks_agree,
                       rank=rank, device=device)
    log_mlflow = _MLflowFromWorker(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else None
    epochs = [0]
    counts = {"images": 0}
    start = time.perf_counter()

    def on_step_end(metrics: dict[str, float], step: int) -> None:
        counts["images"] += micro * world
        last = step == cfg.train.max_steps - 1
        checkpoint_now = (step + 1) % cfg.train.checkpoint_every == 0 and not last
        if step % cfg.train.log_every == 0 or checkpoint_now or last:
            report = {**metrics, "step": step, "epoch": epochs[0],
                      "train_images_per_s": counts["images"] / (time.perf_counter() - start)}
            if log_mlflow is not None:
                log_mlflow(report, step)
            if checkpoint_now:
                if log_mlflow is not None:
                    log_mlflow.grid(generator, cfg, step)
                save_checkpoint(report, step)
            elif not last:  # the last step reports with the final checkpoint, below
                ray.train.report(report)

    def save_checkpoint(report: dict[str, float], step: int) -> None:
        """Every rank writes its ZeRO partitions of both engines; Ray merges the folders."""
        with tempfile.TemporaryDirectory() as tmp:
            gen_engine.save(tmp, "generator")
            critic_engine.save(tmp, "critic")
            if rank == 0:
                (Path(tmp) / "state.json").write_text(json.dumps({"step": step}))
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    shard = ray.train.get_dataset_shard("train")
    with contextlib.closing(prefetched(_batches(shard, micro, device, epochs, cfg.scale.shuffle_buffer),
                                       cfg.scale.prefetch_batches)) as batches:  # closing stops the thread
        result = train_loop(step_fn, batches, cfg.train.max_steps,
                            max_nonfinite_steps=cfg.train.max_nonfinite_steps, log_every=cfg.train.log_every,
                            on_step_end=on_step_end, progress=rank == 0)
    steady_images = (len(result.history) - 1) * micro * world  # after the first batch
    final = {"steps_completed": len(result.history), "train_seconds": result.seconds,
             "data_wait_fraction": result.data_wait_fraction,
             "data_first_batch_seconds": result.first_batch_seconds,
             "train_images_per_s": steady_images / result.seconds if result.seconds else 0.0,
             "nonfinite_steps": result.nonfinite_steps}
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            export_student(generator, cfg.generator.timesteps, Path(tmp) / STUDENT_DIR)
            (Path(tmp) / "train_metrics.json").write_text(json.dumps(final))
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
