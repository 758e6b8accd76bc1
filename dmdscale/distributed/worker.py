"""DMD2 on a Ray Train worker: the per-worker side of a run (the driver side is `launch`).

Each worker loads the frozen teacher through its family, copies it into the generator and the
fake score (DMD2 starts both from the teacher), wrapping each in its DeepSpeed ZeRO engine as
soon as it is made, places the teacher (whole, or partitioned with scale.shard_teacher), and
runs the plain `train_loop` over its Ray Data shard. Rank 0 logs to MLflow; every
rank reports to Ray Train at the same steps (reports are collective).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from dmdscale.config import Config, ConfigError
from dmdscale.contracts import Family
from dmdscale.core import seeds
from dmdscale.core.ema import GeneratorEMA, ema_name
from dmdscale.core.loop import LoopResult, prefetched, train_loop
from dmdscale.core.optim import Role
from dmdscale.core.step import Batch, DMD2Step
from dmdscale.data.latents import TEXT_COLUMNS
from dmdscale.distributed.checkpoint.faults import InjectedFailure
from dmdscale.distributed.checkpoint.integrity import checkpoint_folders, checkpoints_before, load_latest_good
from dmdscale.distributed.checkpoint.journal import RunJournal
from dmdscale.distributed.checkpoint.stages import load_stage, save_stage
from dmdscale.distributed.checkpoint.state import (
    DataPosition,
    EMACheckpoint,
    TrainingState,
    load_training_state,
    rng_states,
    save_run_config,
    save_training_state,
    set_rng_states,
)
from dmdscale.distributed.resources import cpu_threads, uses_rollout_actors
from dmdscale.errors import UserError
from dmdscale.core.networks import Denoiser

TRAIN_LOG = "train_log.json"  # rank 0's logged reports (losses by step), a JSON list
TRAIN_METRICS = "train_metrics.json"  # the workers' final figures, in the final checkpoint
WALL_PREFIX = "wall_"  # the final figures' start-up marks (wall clock); the driver turns them into startup_*_s
# The weights not exported as the student (raw, or the EMAs not chosen by export.ema), each
# saved as the family saves its student: <ALTERNATES_DIR>/<name>/, evaluated next to it.
ALTERNATES_DIR = "alternates"


def build_players(cfg: Config, family: Family, teacher_path: str, device: torch.device,
                  wrap: Callable[[torch.nn.Module, Role], Any] | None = None) -> tuple[Denoiser, Any, Any]:
    """(frozen teacher, generator, critic) with generator and fake score copied from the teacher.

    The family may narrow what of the generator trains (e.g. a LoRA adapter); the critic is
    always trained in full. Generator and fake score start from the teacher's fp32 weights and
    keep them (bf16 training runs them under autocast); under train.mixed_precision bf16 the
    frozen teacher is then stored in bf16, as in the DMD2 authors' code (main/sd_guidance.py:
    `real_unet.to(torch.bfloat16)` with fp32 fake and generator UNets).

    `wrap(module, role)`, when given, takes the generator and then the critic as soon as each is
    complete, and what it returns is handed out in their place: the train worker wraps them in
    their DeepSpeed engines there, so under ZeRO-3 each full copy is partitioned (and freed)
    before the next is made; no rank holds three full copies. The teacher waits on the host
    until the fake score is copied from it, and is then placed (`_place_teacher`): whole on
    `device`, or partitioned with scale.shard_teacher before the critic's engine adds its
    optimizer states.
    """
    wrap = wrap or (lambda module, role: module)
    teacher = family.load_teacher(cfg, teacher_path)  # host: each copy moves to device on its own
    generator = copy.deepcopy(teacher).to(device).train().requires_grad_(True)
    family.adapt_generator(cfg, generator)
    if cfg.train.gradient_checkpointing:
        generator.enable_gradient_checkpointing()
    # A new stage starts from another run's weights with fresh optimizers (the EMAs: init_ema),
    # each part read just before it is wrapped.
    _load_part(generator, cfg, "generator")
    generator = wrap(generator, "generator")
    fake_score = copy.deepcopy(teacher)
    # The last copy is made: the teacher is cast and placed (or partitioned) before the fake score
    # joins the generator's engine on the device.
    teacher = _place_teacher(cfg, teacher, device)
    fake_score = fake_score.to(device).train().requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        fake_score.enable_gradient_checkpointing()
    critic = family.critic(cfg, fake_score).to(device)
    _load_part(critic, cfg, "critic")
    return teacher, generator, wrap(critic, "critic")


def _place_teacher(cfg: Config, teacher: Denoiser, device: torch.device) -> Denoiser:
    """The frozen teacher as it trains: bf16 under train.mixed_precision bf16, then whole on
    `device` or partitioned over the ranks (scale.shard_teacher)."""
    if cfg.train.mixed_precision == "bf16":  # after the copies: they must not start from bf16-rounded weights
        teacher.cast_network(torch.bfloat16)
    if cfg.scale.shard_teacher:
        from dmdscale.distributed.engine import shard_frozen

        return shard_frozen(teacher)
    return teacher.to(device)


def build_engines(cfg: Config, family: Family, teacher_path: str, device: torch.device, micro_batch: int) -> tuple[Denoiser, Any, Any]:
    """The train worker's players: (frozen teacher, generator engine, critic engine), each
    trainable player in its DeepSpeed engine (`DeepSpeedOptimizedModule`) as `build_players` makes it."""
    from dmdscale.distributed.engine import DeepSpeedOptimizedModule

    def engine(module: torch.nn.Module, role: Role) -> DeepSpeedOptimizedModule:
        return DeepSpeedOptimizedModule(module, cfg.train, cfg.scale, micro_batch, role=role)

    return build_players(cfg, family, teacher_path, device, wrap=engine)


def regression_pairs(cfg: Config, family: Family, teacher: Denoiser, teacher_path: str,
                     device: torch.device) -> Any:
    """The family's pairs for loss.regression_weight (`family.regression_pairs`: a many-step
    teacher sampling, minutes at the default count), kept under cache_dir/regression_pairs for
    the next run with the same teacher (its weights' hash), pair count, sampler, steps, guidance,
    data shape, precision and seed; any change of those makes them anew. A teacher that is not
    a local folder is not kept."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    from dmdscale.core.sampling import TEACHER_SAMPLER
    from dmdscale.core.step import RegressionPairs
    from dmdscale.eval.cache import folder_fingerprint, key_name, replace_atomically

    if cfg.loss.regression_weight == 0 or not Path(teacher_path).is_dir():
        return family.regression_pairs(cfg, teacher, device)
    lc, data = cfg.loss, cfg.data
    key = {"family": cfg.model.family, "teacher": folder_fingerprint(teacher_path), "sampler": TEACHER_SAMPLER,
           "pairs": lc.regression_pairs, "steps": lc.regression_sampler_steps, "guidance_scale": lc.guidance_scale,
           "shape": [data.channels, data.resolution, data.num_classes], "precision": cfg.train.mixed_precision,
           "seed": cfg.train.seed}
    path = Path(cfg.cache_dir).expanduser() / "regression_pairs" / f"{key_name(key)}.safetensors"
    if path.is_file():
        with contextlib.suppress(OSError, KeyError, SafetensorError):  # a damaged file: made again
            stored = load_file(str(path), device=str(device))
            return RegressionPairs(stored["noise"], stored["target"], stored.get("cond"))
    pairs = family.regression_pairs(cfg, teacher, device)
    if isinstance(pairs.cond, (torch.Tensor, type(None))):  # tensors only (a class label per pair)
        tensors = {"noise": pairs.noise, "target": pairs.target} | ({} if pairs.cond is None else {"cond": pairs.cond})
        data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        replace_atomically(path, lambda f: f.write(data))  # whole or none: ranks and runs may write it at once
        path.with_suffix(".json").write_text(json.dumps(key, indent=1))
    return pairs


def _load_part(module: torch.nn.Module, cfg: Config, part: str) -> None:
    """train.init's weights of `part` into `module`, when it has them."""
    if cfg.train.init is None:
        return
    state = load_stage(cfg.train.init, (part,), generator_ema=cfg.train.init_ema).get(part)
    if state is None:
        return
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:  # a user error: the run's failure policy does not retry it
        first = " ".join(line.strip() for line in str(exc).splitlines()[:2])  # "Error(s) in ...:", the first one
        raise ConfigError(f"train.init: the {part} weights in {cfg.train.init} do not fit this run's {part} "
                          f"(another teacher, head or LoRA setting?): {first}") from None


def init_ema(cfg: Config, generator: torch.nn.Module) -> GeneratorEMA | None:
    """The generator's EMAs (train.ema_decays), continuing train.init's averages where it has them."""
    if not cfg.train.ema_decays:
        return None
    ema = GeneratorEMA(generator, cfg.train.ema_decays, cfg.train.ema_power)
    if cfg.train.init is not None:
        start = load_stage(cfg.train.init, ("ema",))
        if "ema" in start:
            ema.load_state_dict(start["ema"], strict=False)
    return ema


def to_batch(columns: dict[str, torch.Tensor]) -> Batch:
    """A Ray Data batch as the step's Batch: pixels + labels, or latents + text embeddings."""
    if "latent" in columns:
        return Batch(columns["latent"], {k: columns[k] for k in TEXT_COLUMNS if k in columns})
    return Batch(columns["image"], columns.get("label"))


def shard_batches(shard: Any, batch_size: int, device: torch.device, shuffle_buffer: int, seed: int,
                  position: DataPosition, convert: Callable[[dict[str, torch.Tensor]], Any] = to_batch) -> Iterator[Any]:
    """Endless batches from this worker's Ray Data shard, epoch after epoch, from `position`,
    each a dict of tensors made into the step's input by `convert` (default: a DMD2 `Batch`).

    The local shuffle is seeded by epoch, so a resumed run skips into the same epoch order it
    left (as far as Ray Data's block order within a shard repeats). The reader records the
    epoch's length in `position` when it first reaches an epoch's end.
    """
    epoch, skip = position.epoch, position.batch
    while True:
        count = 0
        for b in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                          local_shuffle_buffer_size=shuffle_buffer or None,
                                          local_shuffle_seed=seeds.data_shuffle(seed, epoch) if shuffle_buffer else None):
            count += 1
            if count > skip:
                yield convert(b)
        if count == 0:
            raise ValueError(f"this worker's data shard holds fewer rows than its batch ({batch_size}): "
                             "lower train.batch_size or scale.num_workers")
        position.epoch_length, epoch, skip = count, epoch + 1, 0


def all_ranks_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a small tensor (e.g. squared gradient norms), on every rank."""
    if not torch.distributed.is_initialized():
        return values
    total = values.detach().float().cpu().clone()  # gloo reduces CPU tensors, NCCL device ones
    if torch.distributed.get_backend() == "nccl":
        total = total.to(values.device)
    torch.distributed.all_reduce(total)
    return total.to(values.device)


def all_ranks_agree(ok: bool) -> bool:
    """True only if every rank's flag is True (a skipped step must be skipped everywhere)."""
    if not torch.distributed.is_initialized():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


class TrainWorker:
    """One worker's whole run: players and engines, resume, the loop, reports and checkpoints.

    Built again after a failure; it then resumes from the latest checkpoint that
    `ray.train.get_checkpoint()` hands back. `config` is what `launch.fit_on_ray` passes:
    the run's config, the teacher's path, the MLflow run, the evaluation pool, a failure to
    inject.
    """

    def __init__(self, config: dict[str, Any]):
        import ray.train
        import ray.train.torch

        from dmdscale.tracking import MlflowSink

        # Start-up marks (dmdscale.startup.WORKER_MARKS), wall clock: the driver measures them
        # from the command's start.
        self.marks = {"worker": time.time()}
        self.cfg = cfg = Config.model_validate(config["cfg"])
        self.family = family = config["family"]  # resolved once on the driver
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads(cfg, ctx.get_local_world_size()))
        torch.manual_seed(cfg.train.seed)
        self.micro = cfg.train.batch_size // self.world
        self.teacher_path = config["teacher_path"]
        teacher, self.generator_engine, self.critic_engine = build_engines(cfg, family, self.teacher_path,
                                                                           self.device, self.micro)
        self.generator, self.teacher = self.generator_engine.module, teacher
        self.ema = init_ema(cfg, self.generator)
        self.engines = {"generator": self.generator_engine, "critic": self.critic_engine}
        if self.ema is not None:
            self.engines["ema"] = EMACheckpoint(self.ema, self.rank)
        pairs = regression_pairs(cfg, family, self.teacher, self.teacher_path, self.device)
        self.step_fn = DMD2Step(cfg, self.teacher, self.generator_engine, self.critic_engine, ema=self.ema,
                                regression_pairs=pairs,
                                sync_flag=all_ranks_agree, sync_sum=all_ranks_sum, rank=self.rank,
                                world_size=self.world, device=self.device)
        self.eval_pool = config.get("eval_pool")
        self.rollouts: Any = None  # the rollout pool, started in run() when the run uses one
        self.fail_at = config.get("fail_at_step")
        # Rank 0 logs into the driver's MLflow run (never raising), and keeps what it logged:
        # the run folder's train_log.json, carried through checkpoints so it survives a resume.
        self.mlflow_sink = MlflowSink(config.get("tracking_uri"), config.get("run_id")) if self.rank == 0 else None
        storage = ctx.get_storage()
        self.storage_fs, self.storage_dir = storage.storage_filesystem, storage.experiment_fs_path
        self.start_step, self.position, self.logged = self._resume()
        self.journal = RunJournal(self.storage_fs, self.storage_dir)
        # The config as the driver recorded it in the journal: rank 0 writes it into every
        # checkpoint (CONFIG_FILE), so a lost journal is rebuilt from it and the checkpoints
        # resume only under it.
        self.run_config = self.journal.read().get("config") if self.rank == 0 else None
        self.earlier_starts = self.journal.record_start(self.start_step) if self.rank == 0 else 0
        if self.rank == 0 and self.start_step:
            print(f"dmdscale: resumed from the checkpoint at step {self.start_step} "
                  f"(start {self.earlier_starts + 1} of this run)")
        self.images_seen, self.started = 0, time.perf_counter()
        self.marks["engines"] = time.time()

    def _resume(self) -> tuple[int, DataPosition, list[dict[str, float]]]:
        """(first step, data position, rank 0's log so far) from the latest undamaged checkpoint, if any.

        Ray hands back the latest checkpoint it recorded (its checkpoint_manager_snapshot.json in
        the run's storage folder); without that record (deleted, lost) the checkpoint folders
        there are the run's own all the same (the driver's journal refused any other config's), so
        they are found by listing them, newest first.
        """
        import ray.train

        latest = ray.train.get_checkpoint()
        if latest is None:
            fs, found = self.storage_fs, checkpoint_folders(self.storage_fs, self.storage_dir)
            if not found:
                return 0, DataPosition(), []
            candidates: Iterator[Any] = (ray.train.Checkpoint(path, fs) for path in found)
        else:
            # A damaged latest checkpoint falls back to the ones Ray wrote before it, newest first
            # (listed only if needed); every rank verifies all files, so all pick the same one.
            fs = latest.filesystem
            older = (ray.train.Checkpoint(path, fs) for path in checkpoints_before(fs, latest.path))
            candidates = itertools.chain([latest], older)
        state, rngs = load_latest_good(candidates,
                                       functools.partial(load_training_state, modules=self.engines, rank=self.rank))
        set_rng_states(rngs, self.step_fn.rng)
        return state.step, DataPosition(state.data_epoch, state.data_batch), \
            (list(state.logged) if self.rank == 0 else [])

    def run(self) -> None:
        import ray.train

        cfg = self.cfg
        rollouts = None
        if uses_rollout_actors(cfg):
            from dmdscale.distributed.rollouts import RolloutPool

            rollouts = RolloutPool.create(cfg, functools.partial(self.family.load_teacher, cfg, self.teacher_path),
                                          self.rank, self.world, self.device)
            rollouts.start(self.start_step, self.generator_engine.full_state_dict)
            self.rollouts = rollouts
        reader = shard_batches(ray.train.get_dataset_shard("train"), self.micro, self.device,
                               cfg.scale.shuffle_buffer, cfg.train.seed, self.position)
        with contextlib.closing(prefetched(reader, cfg.scale.prefetch_batches)) as batches:  # closing stops the thread
            if rollouts is not None:
                batches = rollouts.attach(batches, self.start_step)
            loop_start = time.time()
            try:
                result = train_loop(self._step, batches, cfg.train.max_steps, start_step=self.start_step,
                                    max_nonfinite_steps=cfg.train.max_nonfinite_steps, log_every=cfg.train.log_every,
                                    on_step_end=self._on_step_end, progress=self.rank == 0)
            finally:
                rollout_stats = rollouts.stats() if rollouts is not None else {}
                if rollouts is not None:
                    rollouts.close()
        self.marks["first_batch"] = loop_start + result.first_batch_seconds
        self._finish(result, rollout_stats)

    def _step(self, batch: Batch, step: int) -> dict[str, float]:
        if step == self.fail_at and self.rank == 0 and self.journal.mark_once(f"failed_at_step_{step}"):
            raise InjectedFailure(f"DMDSCALE_FAIL_AT_STEP={step}: rank 0 fails once here, to rehearse recovery")
        return self.step_fn(batch, step)

    def _on_step_end(self, metrics: dict[str, float], step: int) -> None:
        import ray.train

        cfg = self.cfg
        self.marks.setdefault("first_step", time.time())
        self.position.consumed += 1
        self.images_seen += self.micro * self.world
        if self.rollouts is not None:
            self.rollouts.after_step(step, self.generator_engine.full_state_dict)
        last = step == cfg.train.max_steps - 1
        checkpoint_now = (step + 1) % cfg.train.checkpoint_every == 0 and not last
        if step % cfg.train.log_every == 0 or checkpoint_now or last:
            report = {**metrics, "step": step, "epoch": self.position.now()[0],
                      "train_images_per_s": self.images_seen / (time.perf_counter() - self.started)}
            if self.mlflow_sink is not None:
                self.mlflow_sink.log_metrics(report, step)
                self.logged.append(report)
            if checkpoint_now:
                self._save_checkpoint(report, step)
            elif not last:  # the last step reports with the final checkpoint (_finish)
                ray.train.report(report)

    def _save_checkpoint(self, report: dict[str, float], step: int) -> None:
        """Every rank writes its own part into a local folder; Ray merges them in storage."""
        import ray.train

        epoch, batch = self.position.now()
        with tempfile.TemporaryDirectory() as tmp:
            save_training_state(tmp, TrainingState(step + 1, epoch, batch, self.logged), self.engines,
                                rng_states(self.step_fn.rng), self.rank, config=self.run_config)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if self.eval_pool is not None:
            weights = self.generator_engine.full_state_dict()  # collective under ZeRO-3: every rank gathers
            if self.rank == 0:  # at the count of iterations done, like the final figure at max_steps
                averages = {ema_name(d): self.ema.full_state_dict(d) for d in self.ema.decays} if self.ema else None
                self.eval_pool.submit(step + 1, weights, averages)  # queued on the evaluation actors; never awaited

    def _finish(self, result: LoopResult, rollout_stats: dict[str, Any]) -> None:
        """The final report, with the student (as its family saves it), the figures and the log."""
        import ray.train

        from dmdscale.distributed.engine import stored_numel

        micro, world = self.micro, self.world
        steady_images = (len(result.history) - 1) * micro * world  # after the first batch
        final = {"steps_completed": self.start_step + len(result.history), "resumed_from_step": self.start_step,
                 "restarts": self.earlier_starts, "train_seconds": result.seconds,
                 "data_wait_fraction": result.data_wait_fraction,
                 "data_first_batch_seconds": result.first_batch_seconds,
                 "train_images_per_s": steady_images / result.seconds if result.seconds else 0.0,
                 "nonfinite_steps": result.nonfinite_steps,
                 # what rank 0 stores of the teacher: all of it, or its part with scale.shard_teacher
                 "teacher_parameters_per_rank": stored_numel(self.teacher),
                 **{f"rollout_{k}": v for k, v in rollout_stats.items()},
                 **{f"{WALL_PREFIX}{k}": v for k, v in self.marks.items()}}  # the driver turns these into startup_*_s
        critic = self.critic_engine.full_state_dict()  # collective under ZeRO-3
        with tempfile.TemporaryDirectory() as tmp:
            with self.generator_engine.gathered():  # every rank gathers under ZeRO-3; rank 0 writes
                if self.rank == 0:
                    self._save_students(Path(tmp))
                    save_stage(tmp, {"generator": self.generator.state_dict(), "critic": critic,
                                     "ema": self.ema.state_dict() if self.ema else None}, family=self.cfg.model.family)
                    if self.run_config is not None:  # a lost journal is rebuilt from it ("evaluate")
                        save_run_config(tmp, self.run_config)
                    (Path(tmp) / TRAIN_METRICS).write_text(json.dumps(final))
                    (Path(tmp) / TRAIN_LOG).write_text(json.dumps(self.logged, default=float))
            ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp) if self.rank == 0 else None)

    def _save_students(self, folder: Path) -> None:
        """The exported student (export.ema's average, or the raw weights), and each other set
        of weights under ALTERNATES_DIR/<name>/ for the final evaluation to compare."""
        family, cfg, exported = self.family, self.cfg, self.cfg.export.ema
        decays = self.ema.decays if self.ema is not None else []
        if exported is None:
            family.save_student(cfg, self.generator, folder)
        else:
            with self.ema.swapped_in(exported):
                family.save_student(cfg, self.generator, folder)
            family.save_student(cfg, self.generator, folder / ALTERNATES_DIR / "raw")
        for decay in decays:
            if decay != exported:
                with self.ema.swapped_in(decay):
                    family.save_student(cfg, self.generator, folder / ALTERNATES_DIR / ema_name(decay))


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point, run on every worker.

    A user error (a checkpoint with none undamaged, a train.init that does not fit) is a message,
    not a bug: Ray Train would log its traceback on the worker, so that log is silenced for it
    (the worker ends with it), the run's failure policy (`launch.user_errors_fail`) does not
    retry it, and the command line prints its one line.
    """
    try:
        TrainWorker(config).run()
    except UserError as exc:
        logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)  # "Error in training function"
        raise exc.with_traceback(None) from None
