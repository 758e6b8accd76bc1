"""DMD2 on Ray Train: the per-worker loop and the driver call that launches it.

Each worker loads the frozen teacher with `from_pretrained`, copies it into the generator and
the fake score (DMD2 starts both from the teacher), wraps generator and critic in DeepSpeed ZeRO
engines, and runs the plain `train_loop` over its Ray Data shard. Rank 0 logs to MLflow; every
rank reports to Ray Train at the same steps (reports are collective).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from dmdscale.checkpoint import (DataPosition, InjectedFailure, RunJournal, TrainingState, load_training_state,
                                 rng_states, save_training_state, set_rng_states)
from dmdscale.config import Config
from dmdscale.latents import TEXT_COLUMNS
from dmdscale.loop import prefetched, train_loop
from dmdscale.models.base import Critic, Denoiser
from dmdscale.models.sd import TEXT_FAMILIES, load_sd_teacher
from dmdscale.models.unet2d import ClassConditionalUNet, ConvHead, load_unet_teacher
from dmdscale.schedule import config_for
from dmdscale.step import Batch, DMD2Step

STUDENT_DIR = "student"
STUDENT_UNET_DIR = "student_unet"  # text families: the driver builds STUDENT_DIR around it
STUDENT_LORA = "student_lora.safetensors"


def load_teacher(cfg: Config, teacher_path: str) -> Denoiser:
    """The frozen teacher of `cfg.model.family` from a diffusers folder or hub id (bf16 weights
    for text families under bf16 mixed precision: a frozen network needs no fp32 copy)."""
    if cfg.model.family in TEXT_FAMILIES:
        dtype = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else torch.float32
        return load_sd_teacher(teacher_path, cfg.model.family, dtype)
    return load_unet_teacher(teacher_path)


def lora_config(cfg: Config) -> Any:
    """The generator's peft LoraConfig (B starts at zero, so the student starts as the teacher)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.targets,
                      init_lora_weights="gaussian")


def build_players(cfg: Config, teacher_path: str, device: torch.device) -> tuple[Denoiser, Denoiser, Critic]:
    """(frozen teacher, generator, critic) with generator and fake score copied from the teacher.

    With `lora.enabled` the generator's base weights stay frozen and only a peft LoRA adapter on
    its UNet trains; the critic is always trained in full.
    """
    teacher = load_teacher(cfg, teacher_path).to(device)
    generator = copy.deepcopy(teacher).train().requires_grad_(True)
    fake_score = copy.deepcopy(teacher).train().requires_grad_(True)
    if cfg.lora.enabled:
        generator.requires_grad_(False)
        generator.unet.add_adapter(lora_config(cfg))
    if cfg.train.gradient_checkpointing:
        for model in (generator, fake_score):
            model.unet.enable_gradient_checkpointing()
    return teacher, generator, Critic(fake_score, ConvHead.for_model(fake_score)).to(device)


def uses_rollout_actors(cfg: Config) -> bool:
    """Backward simulation runs on the rollout pool (multi-step students with rollout.mode actors)."""
    return (cfg.rollout.mode == "actors" and len(cfg.generator.timesteps) > 1
            and cfg.generator.backward_simulation)


def uses_eval_actors(cfg: Config) -> bool:
    """Checkpoints are evaluated on actors during training (the class-conditional family only:
    its FID and class accuracy need labels and the digit classifier)."""
    return cfg.eval.during_training and cfg.model.family == "unet2d"


def plan_resources(cfg: Config, cluster_cpus: float) -> dict[str, float]:
    """Resources per train worker, leaving room for what runs beside the workers.

    CPU: `scale.data_cpus` stay with Ray Data and the rollout and evaluation actors get
    theirs; the workers share the rest (a default plan of 1 CPU per worker on a 2-CPU machine
    leaves Ray Data 0 CPUs and deadlocks). GPU: each worker's rollout actors share its GPU,
    and the evaluation actors take their fraction spread over the workers' GPUs.
    """
    rollout_actors = cfg.rollout.num_actors if uses_rollout_actors(cfg) else 0
    eval_actors = cfg.eval.num_actors if uses_eval_actors(cfg) else 0
    workers = cfg.scale.num_workers
    if cfg.scale.use_gpu:
        gpu = 1.0 - rollout_actors * cfg.rollout.actor_gpus - eval_actors * cfg.eval.actor_gpus / workers
        if gpu <= 0:
            raise ValueError(f"rollout.actor_gpus and eval.actor_gpus leave no GPU share for the train workers "
                             f"(each would get {gpu:g})")
        return {"CPU": 1.0, "GPU": gpu}
    side = eval_actors * cfg.eval.actor_cpus + workers * rollout_actors * cfg.rollout.actor_cpus
    share = (cluster_cpus - cfg.scale.data_cpus - side) / workers
    if share <= 0:
        raise ValueError(
            f"scale.num_workers={workers} with scale.data_cpus={cfg.scale.data_cpus} and {side:g} CPUs "
            f"for rollout/evaluation actors does not fit the cluster's {cluster_cpus:g} CPUs"
        )
    return {"CPU": min(1.0, share)}


def _batches(shard: Any, batch_size: int, device: torch.device, shuffle_buffer: int, seed: int,
             position: DataPosition) -> Iterator[Batch]:
    """Endless batches from this worker's Ray Data shard, epoch after epoch, from `position`.

    The local shuffle is seeded by epoch, so a resumed run skips into the same epoch order it
    left (as far as Ray Data's block order within a shard repeats). The reader records the
    epoch's length in `position` when it first reaches an epoch's end.
    """
    epoch, skip = position.epoch, position.batch
    while True:
        count = 0
        for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                          local_shuffle_buffer_size=shuffle_buffer or None,
                                          local_shuffle_seed=seed * 1_000_003 + epoch if shuffle_buffer else None):
            count += 1
            if count > skip:
                yield to_batch(b)
        if count == 0:
            raise ValueError(f"this worker's data shard holds fewer rows than its batch ({batch_size}): "
                             "lower train.batch_size or scale.num_workers")
        position.epoch_length, epoch, skip = count, epoch + 1, 0


def to_batch(columns: dict[str, torch.Tensor]) -> Batch:
    """A Ray Data batch as the step's Batch: pixels + labels, or latents + text embeddings."""
    if "latent" in columns:
        return Batch(columns["latent"], {k: columns[k] for k in TEXT_COLUMNS if k in columns})
    return Batch(columns["image"], columns.get("label"))


def cpu_threads(cfg: Config, local_workers: int) -> int:
    """Torch threads for a CPU worker: the config's, else this node's cores split among its
    workers, less the cores its rollout actors compute on (else trainer and actors fight over
    them: 0.75x on 2 cores, see bench/README.md). Ray's CPU reservation is for scheduling (so
    Ray Data keeps a CPU); decoding is light or done once (data.materialize), and evaluation
    actors run only at checkpoints, so the compute threads may use the rest of the node."""
    if cfg.scale.cpu_threads_per_worker:
        return cfg.scale.cpu_threads_per_worker
    workers = max(local_workers, 1)
    actors = workers * cfg.rollout.num_actors * cfg.rollout.actor_cpus if uses_rollout_actors(cfg) else 0.0
    cores = node_cores() if cfg.scale.cluster_cpus is None else min(node_cores(), max(1, int(cfg.scale.cluster_cpus)))
    return max(1, int((cores - actors) // workers))


def node_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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


def save_student(cfg: Config, generator: Denoiser, folder: Path) -> None:
    """What the final checkpoint carries of the student. Pixel UNets: the finished diffusers
    folder (STUDENT_DIR). Text families: only the UNet (LoRA merged) and the LoRA weights; the
    driver assembles the pipeline around them from the teacher's own VAE and text encoders,
    which need not travel through checkpoint storage."""
    if cfg.model.family not in TEXT_FAMILIES:
        export_student(generator, cfg.generator.timesteps, folder / STUDENT_DIR)
        return
    from safetensors.torch import save_file

    from dmdscale.export import lora_state_dict, merged_unet

    if cfg.lora.enabled:
        lora = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(generator.unet).items()}
        save_file(lora, str(folder / STUDENT_LORA))
        merged_unet(generator.unet).save_pretrained(folder / STUDENT_UNET_DIR)
    else:
        generator.unet.save_pretrained(folder / STUDENT_UNET_DIR)


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point, run on every worker (again after a failure: it then resumes
    from the latest checkpoint that `ray.train.get_checkpoint()` hands back)."""
    import ray.train
    import ray.train.torch

    from dmdscale.engine import DeepSpeedOptimizedModule
    from dmdscale.tracking import MlflowSink

    cfg = Config.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg, ctx.get_local_world_size()))
    torch.manual_seed(cfg.train.seed)
    micro = cfg.train.batch_size // world
    teacher, generator, critic = build_players(cfg, config["teacher_path"], device)
    gen_engine = DeepSpeedOptimizedModule(generator, cfg.train, cfg.scale, micro)
    critic_engine = DeepSpeedOptimizedModule(critic, cfg.train, cfg.scale, micro)
    engines = {"generator": gen_engine, "critic": critic_engine}
    step_fn = DMD2Step(cfg, teacher, gen_engine, critic_engine, sync_flag=_all_ranks_agree,
                       rank=rank, world_size=world, device=device)

    start_step, position, resumed_log = 0, DataPosition(), []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt:
            state, rngs = load_training_state(ckpt, engines, rank)
        set_rng_states(rngs, step_fn.rng)
        start_step, position = state.step, DataPosition(state.data_epoch, state.data_batch)
        resumed_log = state.logged
    storage = ctx.get_storage()
    journal = RunJournal(storage.storage_filesystem, storage.experiment_fs_path)
    earlier_starts = journal.record_start(start_step) if rank == 0 else 0
    if rank == 0 and start_step:
        print(f"dmdscale: resumed from the checkpoint at step {start_step} (start {earlier_starts + 1} of this run)")

    rollouts = None
    if uses_rollout_actors(cfg):
        from dmdscale.rollouts import RolloutPool

        rollouts = RolloutPool.create(cfg, functools.partial(load_teacher, cfg, config["teacher_path"]),
                                      rank, world, device)
        rollouts.start(start_step, gen_engine.full_state_dict)
    eval_pool = config.get("eval_pool")
    fail_at = config.get("fail_at_step")
    # Rank 0 logs into the driver's MLflow run (never raising), and keeps what it logged: the
    # run folder's train_log.json, carried through checkpoints so it survives a resume.
    mlflow_sink = MlflowSink(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else None
    logged: list[dict[str, float]] = list(resumed_log) if rank == 0 else []
    counts = {"images": 0}
    start = time.perf_counter()

    def step_or_fail(batch: Batch, step: int) -> dict[str, float]:
        if step == fail_at and rank == 0 and journal.mark_once(f"failed_at_step_{step}"):
            raise InjectedFailure(f"DMDSCALE_FAIL_AT_STEP={step}: rank 0 fails once here, to rehearse recovery")
        return step_fn(batch, step)

    def on_step_end(metrics: dict[str, float], step: int) -> None:
        position.consumed += 1
        counts["images"] += micro * world
        if rollouts is not None:
            rollouts.after_step(step, gen_engine.full_state_dict)
        last = step == cfg.train.max_steps - 1
        checkpoint_now = (step + 1) % cfg.train.checkpoint_every == 0 and not last
        if step % cfg.train.log_every == 0 or checkpoint_now or last:
            report = {**metrics, "step": step, "epoch": position.now()[0],
                      "train_images_per_s": counts["images"] / (time.perf_counter() - start)}
            if mlflow_sink is not None:
                mlflow_sink.log_metrics(report, step)
                logged.append(report)
            if checkpoint_now:
                save_checkpoint(report, step)
            elif not last:  # the last step reports with the final checkpoint, below
                ray.train.report(report)

    def save_checkpoint(report: dict[str, float], step: int) -> None:
        """Every rank writes its own part into a local folder; Ray merges them in storage."""
        epoch, batch = position.now()
        with tempfile.TemporaryDirectory() as tmp:
            save_training_state(tmp, TrainingState(step + 1, epoch, batch, logged), engines,
                                rng_states(step_fn.rng), rank)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if eval_pool is not None:
            weights = gen_engine.full_state_dict()  # collective under ZeRO-3: every rank gathers
            if rank == 0:  # at the count of iterations done, like the final figure at max_steps
                eval_pool.submit(step + 1, weights)  # queued on the evaluation actors; never awaited

    shard = ray.train.get_dataset_shard("train")
    reader = _batches(shard, micro, device, cfg.scale.shuffle_buffer, cfg.train.seed, position)
    with contextlib.closing(prefetched(reader, cfg.scale.prefetch_batches)) as batches:  # closing stops the thread
        if rollouts is not None:
            batches = rollouts.attach(batches, start_step)
        try:
            result = train_loop(step_or_fail, batches, cfg.train.max_steps, start_step=start_step,
                                max_nonfinite_steps=cfg.train.max_nonfinite_steps, log_every=cfg.train.log_every,
                                on_step_end=on_step_end, progress=rank == 0)
        finally:
            rollout_stats = rollouts.stats() if rollouts is not None else {}
            if rollouts is not None:
                rollouts.close()
    steady_images = (len(result.history) - 1) * micro * world  # after the first batch
    final = {"steps_completed": start_step + len(result.history), "resumed_from_step": start_step,
             "restarts": earlier_starts, "train_seconds": result.seconds,
             "data_wait_fraction": result.data_wait_fraction,
             "data_first_batch_seconds": result.first_batch_seconds,
             "train_images_per_s": steady_images / result.seconds if result.seconds else 0.0,
             "nonfinite_steps": result.nonfinite_steps,
             **{f"rollout_{k}": v for k, v in rollout_stats.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        with gen_engine.gathered():  # every rank gathers under ZeRO-3; rank 0 writes
            if rank == 0:
                save_student(cfg, generator, Path(tmp))
                (Path(tmp) / "train_metrics.json").write_text(json.dumps(final))
                (Path(tmp) / TRAIN_LOG).write_text(json.dumps(logged, default=float))
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def source_paths(cfg: Config) -> tuple[str, str]:
    """(train, held-out) data paths; "digits" builds scikit-learn's digits (with captions such as
    "a handwritten digit 3") as Parquet with a held-out split under cache_dir."""
    if cfg.data.path == "digits":
        from dmdscale.data import build_digits_parquet

        paths = build_digits_parquet(Path(cfg.cache_dir).expanduser() / "digits")
        return str(paths["train"]), str(paths["test"])
    return cfg.data.path, cfg.data.eval_path or cfg.data.path


def run_storage(cfg: Config, out: Path) -> tuple[str, str]:
    """(storage path or URI, run name) of the Ray Train run: where its checkpoints live."""
    storage = cfg.scale.storage_path or str(out / "ray")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().absolute())
    return storage, f"{cfg.name}-{out.name}"


STUDENT_PARTS = (STUDENT_DIR, STUDENT_UNET_DIR, STUDENT_LORA)
TRAIN_LOG = "train_log.json"  # rank 0's logged reports (losses by step), a JSON list


def fit_on_ray(cfg: Config, train_data: Any, teacher_path: str | Path, out: Path, tracker: Any,
               eval_pool: Any = None, fail_at_step: int | None = None) -> dict[str, Any]:
    """Ray Train workers running DMD2 under DeepSpeed over the `train_data` stream.

    A run restarted with the same name and storage resumes from its latest checkpoint. Copies
    what the final checkpoint holds of the student (STUDENT_PARTS) and rank 0's log (TRAIN_LOG)
    into `out` and returns the workers' final metrics.
    """
    import shutil

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage, name = run_storage(cfg, out)
    resources = plan_resources(cfg, cfg.scale.cluster_cpus or ray.cluster_resources().get("CPU", 1.0))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.model_dump(), "teacher_path": str(teacher_path),
                           "tracking_uri": tracker.tracking_uri, "run_id": tracker.run_id,
                           "eval_pool": eval_pool, "fail_at_step": fail_at_step},
        scaling_config=ScalingConfig(num_workers=cfg.scale.num_workers, use_gpu=cfg.scale.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
        datasets={"train": train_data},
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt:
        for part in (*STUDENT_PARTS, TRAIN_LOG):
            src, dst = Path(ckpt) / part, out / part
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            elif src.is_file():
                shutil.copy2(src, dst)
        return json.loads((Path(ckpt) / "train_metrics.json").read_text())
