"""Checkpoint evaluation on separate Ray actors while training goes on.

The driver starts an `EvaluationPool` before training (`EvaluationPool.launch` with the
family's checkpoint evaluator, `Family.start_eval_pool`) and hands it (it pickles: it is a list
of actor handles) to the Ray Train workers. At each checkpoint rank 0 calls `pool.submit(step,
state_dict)`: the weights go into the object store once, an actor acknowledges them as soon
as they sit in its own queue, and a background thread in that actor evaluates them later with
the family's evaluator (`dmdscale.contracts.CheckpointEvaluator`): the final evaluation's figures
under its names, logged to the driver's MLflow run at the checkpoint's step, so checkpoints and
the final figure form one curve, plus a sample grid under `eval_grids/`.

Each actor queues at most `eval.max_queued` checkpoints (each is a full copy of the weights);
a submit to a full queue drops the oldest one waiting, counted in the pool's `dropped` and
logged as `eval_dropped_checkpoints`.

Training never waits for an evaluation; after training the driver calls `pool.drain()`, which
waits for every queued evaluation, then `pool.shutdown()`. Tracking failures are warnings, a
failing evaluation is a result with an `error`, and neither stops the actor.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Any, Callable

import numpy as np
import torch

from dmdscale.eval.checkpoints import warn as _warn

__all__ = ["EvaluationPool", "fit_while_watching"]

_TIMEOUT = 24 * 3600.0  # "no timeout" for threading waits (None is not interruptible everywhere)


class _EvaluationActor:
    """One evaluation actor: a FIFO of submitted weights and one thread evaluating them.

    Created with max_concurrency > 1, so `submit`, `results` and `wait` answer while the
    thread evaluates. Weights arrive as a top-level argument (Ray hands over the state_dict
    itself) and are copied, so the queue no longer depends on the process that put them.
    """

    def __init__(self, index: int, threads: int, max_queued: int, make_evaluator: Callable[..., Any],
                 *evaluator_args: Any):
        import ray

        torch.set_num_threads(threads)
        gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        self.index = index
        self.device = torch.device("cuda", 0) if gpu else torch.device("cpu")  # Ray narrows CUDA_VISIBLE_DEVICES
        # Top-level arguments: Ray hands over the objects (e.g. the held-out images), not refs.
        self.evaluator = make_evaluator(*evaluator_args, device=self.device)
        self.max_queued = max_queued
        self._dropped: list[int] = []  # steps dropped from a full queue
        self._dropped_logged = 0
        self._queue: collections.deque[tuple[int, dict[str, torch.Tensor]]] = collections.deque()
        self._busy: int | None = None
        self._results: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="dmdscale-evaluation", daemon=True)
        self._thread.start()

    def ready(self) -> dict[str, Any]:
        return {"actor": self.index, "device": str(self.device), "threads": torch.get_num_threads()}

    def submit(self, step: int, state_dict: dict[str, torch.Tensor],
               averages: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        """Queue weights (and the generator's averages) for evaluation and return at once (an
        acknowledgement, not a result). A step already queued, in progress or evaluated without
        error is not queued again (a restarted rank 0 may resubmit the checkpoint it resumed from)."""
        def owned(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.detach().clone() for k, v in sd.items()}

        weights = (owned(state_dict), {name: owned(sd) for name, sd in (averages or {}).items()})
        with self._cond:
            done = {r["step"] for r in self._results if "error" not in r}
            duplicate = step == self._busy or step in done or any(s == step for s, _ in self._queue)
            if not duplicate:
                while len(self._queue) >= self.max_queued:  # bounded: the oldest waiting checkpoint goes
                    dropped, _ = self._queue.popleft()
                    self._dropped.append(dropped)
                    _warn(f"evaluation actor {self.index}: dropped the checkpoint of step {dropped} "
                          f"(eval.max_queued={self.max_queued} were waiting)")
                self._queue.append((int(step), weights))
                self._cond.notify_all()
        return {"actor": self.index, "step": int(step), "queued": not duplicate, **self._status()}

    def _status(self) -> dict[str, Any]:
        with self._cond:
            return {"pending": len(self._queue) + (self._busy is not None), "busy_step": self._busy,
                    "finished": len(self._results), "dropped": list(self._dropped)}

    def results(self) -> list[dict[str, Any]]:
        """The finished evaluations so far (does not wait)."""
        with self._cond:
            return list(self._results)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until nothing is queued or in progress (or `timeout` s); the results so far."""
        with self._cond:
            self._cond.wait_for(lambda: not self._queue and self._busy is None,
                                _TIMEOUT if timeout is None else timeout)
            return {"results": list(self._results), "pending": len(self._queue) + (self._busy is not None),
                    "dropped": list(self._dropped)}

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue))
                step, weights = self._queue.popleft()
                self._busy = step
                dropped = list(self._dropped)
            if len(dropped) > self._dropped_logged:  # from this thread only: one MLflow caller per actor
                self._dropped_logged = len(dropped)
                self.evaluator.sink.log_metrics({"eval_dropped_checkpoints": float(len(dropped))}, dropped[-1],
                                                what="the count of dropped checkpoints")
            result: dict[str, Any] = {"step": step}
            try:
                result = self.evaluator.evaluate(step, *weights) | {"actor": self.index}
            except BaseException as exc:  # evaluate reports its own errors; this is a last guard
                result |= {"actor": self.index, "error": f"{type(exc).__name__}: {exc}"}
            finally:
                del weights
                with self._cond:
                    self._results.append(result)
                    self._busy = None
                    self._cond.notify_all()


class EvaluationPool:
    """Handles to the evaluation actors; picklable, so Ray Train workers can submit to it.

    Driver: `pool = EvaluationPool.launch(...)` before training, `pool.drain()` after it, then
    `pool.shutdown()`. Rank 0: `pool.submit(step, state_dict)` at each checkpoint.
    """

    def __init__(self, actors: list[Any], ack_timeout: float | None = 60.0):
        self._actors = list(actors)
        self._next = 0
        self.ack_timeout = ack_timeout
        self.dropped: list[int] = []  # steps dropped from full queues (eval.max_queued), known after drain()

    @classmethod
    def launch(cls, cfg: Any, make_evaluator: Callable[..., Any], *evaluator_args: Any,
               ready_timeout: float | None = 300.0, ack_timeout: float | None = 60.0,
               wait: bool = False) -> "EvaluationPool":
        """Create `cfg.eval.num_actors` actors (each `eval.actor_cpus` CPUs, and `eval.actor_gpus`
        of a GPU when `scale.use_gpu`); each builds `make_evaluator(*evaluator_args, device=...)`,
        the family's checkpoint evaluator (`dmdscale.contracts.CheckpointEvaluator`: `evaluate(step,
        state_dict, averages)` and an MlflowSink `sink`). Numpy arrays among the arguments (e.g.
        the held-out images) go into the object store once for all actors.

        Returns at once: the actors build their evaluators (seconds: a student, the FID features)
        while Ray Train starts its workers, instead of before (bench/fixed_costs.py). A thread
        watches them for `ready_timeout` s and warns about an actor that failed to build or has
        not started (waiting for resources?); its checkpoints then come back with an error and
        training goes on. What an evaluator needs (weights, data) is checked at preflight. With
        `wait`, the watch happens here instead and a failure raises."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        args = [ray.put(a) if isinstance(a, np.ndarray) else a for a in evaluator_args]
        actor_cls = ray.remote(_EvaluationActor).options(
            num_cpus=cfg.eval.actor_cpus,
            num_gpus=cfg.eval.actor_gpus if cfg.scale.use_gpu else 0,
            max_concurrency=4,  # submit / results / wait answer while the thread evaluates
            runtime_env={"env_vars": {"TQDM_DISABLE": "1"}},  # no sampling bars in the driver's log
            # Out of any placement group the driver runs in: a Tune trial's would capture the
            # actors into its own small reservation, where they would never be scheduled.
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
        )
        threads = max(1, int(cfg.eval.actor_cpus))
        actors = [actor_cls.remote(i, threads, cfg.eval.max_queued, make_evaluator, *args)
                  for i in range(cfg.eval.num_actors)]
        pool = cls(actors, ack_timeout)
        readiness = [a.ready.remote() for a in actors]
        if wait:
            _watch_ready(readiness, ready_timeout, raise_errors=True)
        else:
            threading.Thread(target=_watch_ready, args=(readiness, ready_timeout, False), daemon=True,
                             name="dmdscale-evaluation-ready").start()
        return pool

    def __len__(self) -> int:
        return len(self._actors)

    def submit(self, step: int, state_dict: dict[str, torch.Tensor],
               averages: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, Any] | None:
        """Queue a checkpoint's full student state_dict (and the generator's averages by name,
        e.g. {"ema_0.97": ...}) for evaluation at `step`.

        Puts a CPU copy into the object store once and hands it to the next actor (round
        robin), waiting only for its acknowledgement (up to `ack_timeout` s), never for the
        evaluation. Returns the acknowledgement, or None (with a warning) if it did not come;
        never raises, so a broken evaluation actor cannot stop training.
        """
        import ray

        if not self._actors:
            return None
        index = self._next % len(self._actors)
        self._next += 1
        try:
            def cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                return {k: v.detach().cpu() for k, v in sd.items()}

            weights = ray.put(cpu(state_dict))
            extra = ray.put({name: cpu(sd) for name, sd in (averages or {}).items()})
            # top level: the actor gets the dicts themselves
            ack = self._actors[index].submit.remote(int(step), weights, extra)
            return ray.get(ack, timeout=self.ack_timeout)
        except ray.exceptions.GetTimeoutError:
            _warn(f"evaluation actor {index} did not acknowledge the checkpoint at step {step} within "
                  f"{self.ack_timeout:g} s; it stays queued")
        except Exception as exc:
            _warn(f"could not submit the checkpoint at step {step} for evaluation: {type(exc).__name__}: {exc}")
        return None

    def results(self) -> list[dict[str, Any]]:
        """Evaluations finished so far, sorted by step; does not wait for queued ones."""
        return self._collect([a.results.remote() for a in self._actors], None, lambda r: r)

    def drain(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Wait until every queued evaluation has finished; all results, sorted by step.

        Each result is {step, fid_student, kid_student, class_accuracy_student, seconds, actor}
        (figures None when not computed), plus `error` if the evaluation failed and `tracking_error`
        if MLflow logging failed. With a `timeout` (s), evaluations still running then are
        left out with a warning. A dead actor's results are lost (with a warning); what it
        had logged stays in MLflow.
        """
        refs = [a.wait.remote(timeout) for a in self._actors]
        get_timeout = None if timeout is None else timeout + 30.0

        dropped: list[int] = []

        def unpack(answer: dict[str, Any]) -> list[dict[str, Any]]:
            if answer["pending"]:
                _warn(f"{answer['pending']} checkpoint evaluations were still queued or running "
                      f"after {timeout:g} s; left out")
            dropped.extend(answer["dropped"])
            return answer["results"]

        results = self._collect(refs, get_timeout, unpack)
        self.dropped = sorted(dropped)
        if dropped:
            _warn(f"{len(dropped)} checkpoints were not evaluated (steps {self.dropped}): evaluations lagged behind "
                  f"training with eval.max_queued waiting; add eval.num_actors or evaluate less often")
        return results

    @staticmethod
    def _collect(refs: list[Any], timeout: float | None,
                 unpack: Callable[[Any], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        import ray

        out: list[dict[str, Any]] = []
        for i, ref in enumerate(refs):
            try:
                out.extend(unpack(ray.get(ref, timeout=timeout)))
            except Exception as exc:
                _warn(f"no results from evaluation actor {i}: {type(exc).__name__}: {exc}")
        return sorted(out, key=lambda r: (r["step"], r.get("actor", 0)))

    def shutdown(self) -> None:
        """Kill the actors (queued evaluations are dropped: drain first)."""
        import ray

        for actor in self._actors:
            try:
                ray.kill(actor)
            except Exception:
                pass
        self._actors = []


def _watch_ready(readiness: list[Any], timeout: float | None, raise_errors: bool) -> None:
    """Wait up to `timeout` s for the actors' `ready` answers; an actor that could not build its
    evaluator raises (`raise_errors`) or is warned about, one still waiting is warned about."""
    import ray

    ready, waiting = ray.wait(readiness, num_returns=len(readiness), timeout=timeout)
    for ref in ready:
        try:
            ray.get(ref)
        except Exception as exc:
            if raise_errors:
                raise
            _warn(f"an evaluation actor could not build its evaluator ({type(exc).__name__}: {exc}); "
                  f"the checkpoints sent to it are not evaluated, training goes on")
    if waiting:
        _warn(f"{len(waiting)} of {len(readiness)} evaluation actors did not start within {timeout:g} s "
              f"(waiting for resources?); checkpoints queue until they do")


def fit_while_watching(fit: Callable[[], dict[str, Any]], eval_pool: EvaluationPool,
                       on_evaluation: Callable[[dict[str, Any]], None] | None = None,
                       poll_seconds: float = 2.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`fit()`, then every checkpoint evaluation once the pool has finished them all. With
    `on_evaluation`, fit runs in a thread while this one hands each finished evaluation to it
    as it lands (a sweep trial reports it to Tune, whose scheduler may stop the trial on it).
    Returns fit's metrics and every evaluation, sorted by step."""
    if on_evaluation is None:
        train_metrics = fit()
        return train_metrics, eval_pool.drain()
    delivered: set[int] = set()

    def deliver(results: list[dict[str, Any]]) -> None:
        for result in results:
            if result["step"] not in delivered:
                delivered.add(result["step"])
                on_evaluation(result)

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="dmdscale-fit") as pool:
        future = pool.submit(fit)
        while True:
            try:
                train_metrics = future.result(timeout=poll_seconds)
                break
            except concurrent.futures.TimeoutError:
                deliver(eval_pool.results())
    evaluations = eval_pool.drain()
    deliver(evaluations)
    return train_metrics, evaluations
