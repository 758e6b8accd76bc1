"""The Ray cluster a run uses: joining it (never a dead one), and checking, before any slow work,
that it can ever hold what the run asks for.

`ray.init()` with no address joins whatever cluster the Ray temp dir last recorded; after a
killed local run that address is dead and Ray retries it for minutes. `connect` checks the
recorded address first (a TCP connect, 2 s) and starts a fresh local cluster when it is dead.

A request larger than the cluster waits forever in Ray Train and Ray Data ("pending: 8 CPU,
8 GPU"). `ensure_fits` compares each stage's request with the cluster's totals: on a cluster
this process started (no autoscaler can add nodes) a request that does not fit is an immediate
error naming the keys to change; on a cluster joined by address (which may autoscale) the wait
is announced with what is pending, asked of the autoscaler, and bounded by scale.resource_wait_s.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from dmdscale.config import Config, ConfigError
from dmdscale.contracts import Family

_started_here = False  # this process started the local cluster it is connected to


def _reachable(address: str, timeout: float = 2.0) -> bool:
    """Whether host:port accepts a TCP connection (a live GCS does at once)."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def recorded_address() -> tuple[str | None, str]:
    """(the address Ray's temp dir records for `ray.init()` to join, or None; that file)."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            return f.read().strip() or None, path
    except OSError:
        return None, path


def connect(**init_kwargs: Any) -> None:
    """ray.init for a run: RAY_ADDRESS when set (a clear error when it does not answer), else the
    recorded local cluster when it is alive, else a fresh local cluster."""
    global _started_here
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address and address not in ("auto", "local") and "://" not in address and not _reachable(address):
        raise ConfigError(f"RAY_ADDRESS={address}: no Ray cluster answers there; start it (ray start --head) "
                          f"or unset RAY_ADDRESS to run on a fresh local cluster")
    if not address:
        recorded, path = recorded_address()
        if recorded is None or not _reachable(recorded):
            if recorded is not None:
                print(f"dmdscale: the Ray cluster recorded in {path} ({recorded}) is not running (left by a "
                      f"killed run?); starting a fresh local one", file=sys.stderr, flush=True)
            ray.init(address="local", **init_kwargs)
            _started_here = True
            return
    ray.init(**init_kwargs)


def may_autoscale() -> bool:
    """False for a cluster this process started (nothing can add nodes to it): through `connect`,
    or by a plain ray.init() whose node (Ray's own record) is the head it launched."""
    import ray._private.worker

    node = getattr(ray._private.worker, "_global_node", None)
    return not (_started_here or getattr(node, "head", False))


@dataclass(frozen=True)
class Demand:
    """What one stage of a run holds at once, and the keys that size it."""

    stage: str
    resources: dict[str, float]
    keys: str


def run_demands(cfg: Config, family: Family) -> list[Demand]:
    """The stages of a Ray run, each of which must fit the cluster on its own: the family's data
    encoding (if any), then training with its side actors."""
    from dmdscale.distributed.resources import MIN_WORKER_CPUS, SideActors, run_resources

    need = run_resources(cfg, family)
    if not cfg.scale.use_gpu:  # CPU workers share what the rest leaves (worker_resources), a minimum each
        need["CPU"] = cfg.scale.num_workers * MIN_WORKER_CPUS + cfg.scale.data_cpus + SideActors.of(cfg, family).cpus(cfg)
    training = Demand("training", need,
                      "scale.num_workers, scale.use_gpu, scale.data_cpus, eval.num_actors, rollout.num_actors")
    return [*family.data_demands(cfg), training]


def missing(need: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    """The resources `need` asks for beyond `have` (empty when it fits)."""
    return {k: v - have.get(k, 0.0) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items())) or "nothing"


def ensure_fits(cfg: Config, family: Family, *, cluster: Callable[[], dict[str, float]] | None = None,
                autoscales: bool | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
    """Raise ConfigError when a stage of the run can never be scheduled (see the module docstring).
    `cluster` (the cluster's total resources) and `autoscales` are injectable for tests."""
    import ray

    if cluster is None:
        if ray.get_runtime_context().worker.mode != ray.SCRIPT_MODE:
            return  # inside a Ray task (a sweep trial): its driver checked the request
        cluster = ray.cluster_resources
    autoscales = may_autoscale() if autoscales is None else autoscales
    deadline = time.monotonic() + cfg.scale.resource_wait_s
    for demand in run_demands(cfg, family):
        short = missing(demand.resources, cluster())
        if short and autoscales and cfg.scale.resource_wait_s > 0:
            print(f"dmdscale: {demand.stage} needs {_describe(demand.resources)}; the cluster lacks "
                  f"{_describe(short)}. Asking the autoscaler and waiting up to scale.resource_wait_s="
                  f"{cfg.scale.resource_wait_s:g} s", file=sys.stderr, flush=True)
            _request(demand.resources)
            while short and time.monotonic() < deadline:
                sleep(5.0)
                short = missing(demand.resources, cluster())
        if short:
            waited = f" after waiting {cfg.scale.resource_wait_s:g} s" if autoscales else ""
            raise ConfigError(
                f"{demand.stage} needs {_describe(demand.resources)} but the Ray cluster has "
                f"{_describe({k: cluster().get(k, 0.0) for k in demand.resources})}{waited} (short of "
                f"{_describe(short)}); change {demand.keys}, or run on a larger cluster")


def _request(resources: dict[str, float]) -> None:
    """Ask the autoscaler for the resources now (it would otherwise see them only once pending)."""
    try:
        from ray.autoscaler.sdk import request_resources

        gpus = int(resources.get("GPU", 0))  # one bundle per GPU: a node need not hold them all
        request_resources(num_cpus=int(resources.get("CPU", 0) + 0.999), bundles=[{"GPU": 1}] * gpus)
    except Exception as exc:  # no autoscaler to ask: the bounded wait still applies
        print(f"dmdscale: could not ask the autoscaler ({type(exc).__name__}: {exc})", file=sys.stderr)
