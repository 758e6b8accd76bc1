"""The one resource planner: what a run's train workers, Ray Data, and its rollout and
evaluation actors take from the cluster, and the torch threads a CPU worker computes with.

The run (Ray Train: `worker_resources`) and the sweep (how many whole runs fit at once:
`run_resources`) read the same plan, so they cannot disagree about what a run needs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from dmdscale.config import Config, ConfigError
from dmdscale.contracts import Family

# A CPU train worker below this share of a CPU is not a plan but an accident (64 workers on
# 2 CPUs got 0.012 each).
MIN_WORKER_CPUS = 0.25


def uses_rollout_actors(cfg: Config) -> bool:
    """Backward simulation runs on the rollout pool (multi-step students with rollout.mode actors)."""
    return (cfg.rollout.mode == "actors" and len(cfg.generator.timesteps) > 1
            and cfg.generator.backward_simulation)


def uses_eval_actors(cfg: Config, family: Family) -> bool:
    """Checkpoints are evaluated on actors during training, for families that have such an
    evaluation (unet2d: FID and class accuracy; sd15/sdxl: FID and CLIP score on held-out prompts)."""
    return cfg.eval.during_training and family.has_eval_actors


@dataclass(frozen=True)
class SideActors:
    """The actors a run starts beside its train workers, in total over the run."""

    rollout: int  # workers x rollout.num_actors
    evaluation: int

    @classmethod
    def of(cls, cfg: Config, family: Family) -> "SideActors":
        per_worker = cfg.rollout.num_actors if uses_rollout_actors(cfg) else 0
        return cls(per_worker * cfg.scale.num_workers, cfg.eval.num_actors if uses_eval_actors(cfg, family) else 0)

    def cpus(self, cfg: Config) -> float:
        return self.rollout * cfg.rollout.actor_cpus + self.evaluation * cfg.eval.actor_cpus


def worker_resources(cfg: Config, family: Family, cluster_cpus: float) -> dict[str, float]:
    """Resources per train worker, leaving room for what runs beside the workers.

    CPU: `scale.data_cpus` stay with Ray Data and the rollout and evaluation actors get
    theirs; the workers share the rest (a default plan of 1 CPU per worker on a 2-CPU machine
    leaves Ray Data 0 CPUs and deadlocks). GPU: each worker's rollout actors share its GPU,
    and the evaluation actors take their fraction spread over the workers' GPUs.
    """
    side, workers = SideActors.of(cfg, family), cfg.scale.num_workers
    if cfg.scale.use_gpu:
        gpu = (1.0 - side.rollout / workers * cfg.rollout.actor_gpus
               - side.evaluation * cfg.eval.actor_gpus / workers)
        if gpu <= 0:
            raise ValueError(f"rollout.actor_gpus and eval.actor_gpus leave no GPU share for the train workers "
                             f"(each would get {gpu:g})")
        return {"CPU": 1.0, "GPU": gpu}
    free = cluster_cpus - cfg.scale.data_cpus - side.cpus(cfg)
    share = free / workers
    if share < MIN_WORKER_CPUS:
        fit = int(free / MIN_WORKER_CPUS)
        raise ConfigError(
            f"scale.num_workers={workers} with scale.data_cpus={cfg.scale.data_cpus} and {side.cpus(cfg):g} CPUs "
            f"for rollout/evaluation actors leaves each train worker {max(share, 0):.3g} of the cluster's "
            f"{cluster_cpus:g} CPUs (at least {MIN_WORKER_CPUS} each); "
            + (f"use scale.num_workers <= {fit}" if fit else "lower scale.data_cpus or the actors' CPUs"))
    return {"CPU": min(1.0, share)}


def run_resources(cfg: Config, family: Family) -> dict[str, float]:
    """What one whole run takes from the cluster: its workers (a GPU each, or a CPU each at
    most), Ray Data's CPUs, and the rollout and evaluation actors."""
    scale = cfg.scale
    need = {"CPU": scale.num_workers + scale.data_cpus + SideActors.of(cfg, family).cpus(cfg)}
    return need | ({"GPU": float(scale.num_workers)} if scale.use_gpu else {})


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
