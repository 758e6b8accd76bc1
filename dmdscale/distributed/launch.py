"""The driver side of a run on Ray: a `TorchTrainer` of `worker.train_worker` (or a stage's
worker: the ODE-regression stage's) over a Ray Data stream, with checkpoints in Ray Train
storage, resume and a failure budget (spent on failures only: a user error on a worker ends
the run at once, `trainer_class`); what the final checkpoint holds of the student is copied
into the run folder."""
from __future__ import annotations

import functools
import json
import shutil
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from dmdscale.config import Config
from dmdscale.contracts import Family
from dmdscale.distributed.resources import worker_resources
from dmdscale.distributed.worker import TRAIN_METRICS, train_worker
from dmdscale.errors import user_error_in


def run_storage(cfg: Config, out: Path) -> tuple[str, str]:
    """(storage path or URI, run name) of the Ray Train run: where its checkpoints live."""
    storage = cfg.scale.storage_path or str(out / "ray")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().absolute())
    return storage, f"{cfg.name}-{out.name}"


@functools.cache
def user_errors_fail() -> type:
    """Ray Train's default failure policy, except that a worker's user error (`UserError`: no
    undamaged checkpoint, a train.init that does not fit) is raised at once: a retry would meet
    it again, after starting the workers and loading the teacher anew, and the run would end in
    each attempt's traceback. Any other failure spends FailureConfig(max_failures) as before.
    A class made on first use (Ray Train's modules load only when a run trains on Ray); Ray
    ships it to the run's controller by value."""
    from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    class UserErrorsFail(DefaultFailurePolicy):
        def make_decision(self, training_failed_error: Exception) -> FailureDecision:
            if isinstance(training_failed_error, WorkerGroupError) and any(
                    user_error_in(e) is not None for e in training_failed_error.worker_failures.values()):
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    return UserErrorsFail


@functools.cache
def trainer_class() -> type:
    """`TorchTrainer` with the `user_errors_fail` failure policy in place of the default."""
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            kwargs["failure_policy"] = user_errors_fail()(self.run_config.failure_config)
            return super()._initialize_and_run_controller(**kwargs)

    return Trainer


STORED_CONFIG = "stored_config"  # train_loop_config's one key: the worker's config in the object store


def _with_stored_config(worker: Callable[[dict[str, Any]], None], config: dict[str, Any]) -> None:
    """Ray Train's entry point on each worker: `worker` on the config `fit_on_ray` stored."""
    import ray

    worker(ray.get(config[STORED_CONFIG]))


def fit_on_ray(cfg: Config, family: Family, train_data: Any, teacher_path: str | Path, out: Path, tracker: Any,
               parts: Sequence[str], *, worker: Callable[[dict[str, Any]], None] = train_worker, stage: str = "",
               **worker_args: Any) -> dict[str, Any]:
    """Ray Train workers running `worker` under DeepSpeed over the `train_data` stream: DMD2
    (`worker.train_worker`, the default), or a stage before it (`stage`: its name, added to the
    Ray Train run's, e.g. the ODE-regression stage's `regression.regression_worker`).

    A run restarted with the same name and storage resumes from its latest checkpoint. Copies
    `parts` (for DMD2: what the family's `save_student` wrote, the other weights' students
    (ALTERNATES_DIR), what a next stage starts from (STAGE_DIR) and rank 0's log (TRAIN_LOG))
    from the final checkpoint into `out`, and returns the workers' final metrics (TRAIN_METRICS).
    `worker_args` join the worker's config (for DMD2: the evaluation pool, a failure to inject).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    storage, name = run_storage(cfg, out)
    resources = worker_resources(cfg, family, cfg.scale.cluster_cpus or ray.cluster_resources().get("CPU", 1.0))
    # Ray Train's controller unpickles train_loop_config (it is part of the run's context) but
    # never reads it: handed over as one object-store reference, the controller does not import
    # the family's torch and diffusers (~7 s of CPU beside the workers' start on 2 cores).
    stored = ray.put({"cfg": cfg.model_dump(), "family": family, "teacher_path": str(teacher_path),
                      "tracking_uri": tracker.tracking_uri, "run_id": tracker.run_id, **worker_args})
    trainer = trainer_class()(
        functools.partial(_with_stored_config, worker),
        train_loop_config={STORED_CONFIG: stored},
        scaling_config=ScalingConfig(num_workers=cfg.scale.num_workers, use_gpu=cfg.scale.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"{name}-{stage}" if stage else name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.checkpoints_to_keep),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
        datasets={"train": train_data},
    )
    # Ray Train's Ctrl-C handler (abort the run) outlives fit(); left in place, a Ctrl-C in the
    # final evaluation would call a finished controller and exit 0 with the run folder unwritten.
    handler = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)
    with result.checkpoint.as_directory() as ckpt:
        for part in parts:
            src, dst = Path(ckpt) / part, out / part
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            elif src.is_file():
                shutil.copy2(src, dst)
        return json.loads((Path(ckpt) / TRAIN_METRICS).read_text())
