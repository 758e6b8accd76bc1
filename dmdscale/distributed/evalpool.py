"""Checkpoint evaluation on separate Ray actors while training goes on.

The driver starts an `EvaluationPool` before training and hands it (it pickles: it is a list
of actor handles) to the Ray Train workers. At each checkpoint rank 0 calls `pool.submit(step,
state_dict)`: the weights go into the object store once, an actor acknowledges them as soon
as they sit in its own queue, and a background thread in that actor evaluates them later:
`eval.num_samples` student samples with the final evaluation's labels and seed, FID and KID
against the held-out images with the final evaluation's extractor, class accuracy when that
extractor is the digit classifier, all logged to the driver's MLflow run at the checkpoint's
step under the final evaluation's names (`fid_student`, `kid_student`, `class_accuracy_student`),
so checkpoints and the final figure form one curve; plus a 10-per-class sample grid under
`eval_grids/`. The text families (sd15, sdxl) run a `TextCheckpointEvaluator` on the same actors
instead: the student pipeline rebuilt around the checkpoint's UNet, the final evaluation's
held-out prompts and seed, FID/KID, CLIP score and a prompt-captioned grid.

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
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dmdscale.core import seeds

# dmdscale.eval.metrics and dmdscale.eval.plots (torchvision, clean-fid, matplotlib) are imported where
# they are used: a train worker that unpickles the pool only submits.

__all__ = ["EvaluationPool", "CheckpointEvaluator", "TextCheckpointEvaluator", "eval_spec", "text_eval_spec",
           "GRID_ARTIFACT_DIR"]

GRID_ARTIFACT_DIR = "eval_grids"
_TIMEOUT = 24 * 3600.0  # "no timeout" for threading waits (None is not interruptible everywhere)


def _warn(message: str) -> None:
    # print, not warnings.warn: the default filter would show a repeated failure only once.
    print(f"warning: {message}", file=sys.stderr, flush=True)


def eval_spec(cfg: Any) -> dict[str, Any]:
    """What the final evaluation (UNet2DFamily.evaluate in dmdscale.families.unet2d) samples the student with: the
    same labels, image shape, noise seed and timesteps, so a checkpoint's FID is comparable."""
    n, c, r = cfg.eval.num_samples, cfg.data.channels, cfg.data.resolution
    return {"labels": np.arange(n) % cfg.data.num_classes, "shape": (c, r, r),
            "seed": seeds.evaluation_noise(cfg.train.seed), "timesteps": list(cfg.generator.timesteps),
            "num_classes": cfg.data.num_classes}


class CheckpointEvaluator:
    """Evaluates student weights and logs the figures; what each actor runs (usable in-process).

    `build_generator()` returns the student architecture (e.g. the teacher loaded with
    `load_unet`), built once; each evaluation loads a full state_dict into it.
    """

    def __init__(self, build_generator: Callable[[], nn.Module], spec: dict[str, Any],
                 real_images: np.ndarray, extractor: str | nn.Module, tracking_uri: str | None,
                 run_id: str | None, device: torch.device | str = "cpu"):
        from dmdscale.tracking import MlflowSink

        self.device = torch.device(device)
        self.model = build_generator().to(self.device).eval().requires_grad_(False)
        self.spec = spec
        self.real = np.array(real_images, copy=True)  # owned here, not a view into the object store
        self.extractor = extractor
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.sink = MlflowSink(tracking_uri, run_id)  # its calls never raise

    def evaluate(self, step: int, state_dict: dict[str, torch.Tensor],
                 averages: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        """{step, fid_student, kid_student, class_accuracy_student (None without a classifier),
        the sample quality figures of `sample_quality_of` (`swd_pixels_student`,
        `recall_classifier_student`, ...), seconds}, with `error` instead of figures if the
        evaluation raised, and `tracking_error` if logging failed (the figures are still returned).
        Each of `averages` (e.g. {"ema_0.97": weights}) adds the same figures as `*_student_<name>`."""
        t0 = time.perf_counter()
        result: dict[str, Any] = {"step": int(step), "fid_student": None, "kid_student": None,
                                  "class_accuracy_student": None}
        try:
            images = self._figures("student", state_dict, step, result)
            for name, weights in (averages or {}).items():
                self._figures(f"student_{name}", weights, step, result)
        except Exception as exc:  # reported in the result; the actor goes on with the next one
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["seconds"] = time.perf_counter() - t0
            _warn(f"evaluation of the checkpoint at step {step} failed: {result['error']}")
            return result
        problems = self._log(int(step), result, images)
        if problems:
            result["tracking_error"] = "; ".join(problems)
        result["seconds"] = time.perf_counter() - t0
        return result

    def _figures(self, who: str, state_dict: dict[str, torch.Tensor], step: int, result: dict[str, Any]) -> np.ndarray:
        """Sample `state_dict`'s student and add `who`'s figures to `result`; its images."""
        from dmdscale.eval.metrics import (
            DigitClassifier,
            class_accuracy,
            compute_fid_kid,
            sample_quality_of,
            sample_student,
        )

        self.model.load_state_dict(state_dict)
        spec = self.spec
        images = sample_student(self.model, spec["timesteps"], spec["labels"], spec["shape"],
                                spec["seed"], self.device, desc=f"evaluate step {step}: {who}")
        result[f"fid_{who}"], result[f"kid_{who}"] = compute_fid_kid(images, self.real, self.extractor)
        classifier = self.extractor if isinstance(self.extractor, DigitClassifier) else None
        if classifier is not None:
            result[f"class_accuracy_{who}"] = class_accuracy(classifier, images, spec["labels"])
        result |= sample_quality_of(who, self.real, images, classifier, spec["seed"])
        return images

    def _log(self, step: int, result: dict[str, Any], images: np.ndarray) -> list[str]:
        from dmdscale.eval.plots import first_per_class, save_grid

        labels = self.spec["labels"]
        shown = first_per_class(labels, 10)
        return log_evaluation(self.sink, step, result, lambda path: save_grid(
            images[shown], labels[shown], path, title=f"step {step}: FID {result['fid_student']:.2f}"))


def log_evaluation(sink: Any, step: int, result: dict[str, Any], draw_grid: Callable[[Path], Path]) -> list[str]:
    """A checkpoint evaluation's figures at `step` and its sample grid (`draw_grid(path)`) into the
    MLflow run; failures are returned, never raised (the sink prints one warning per outage)."""
    if not sink.enabled:
        return []
    problems = []
    figures = {k: v for k, v in result.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not sink.log_metrics(figures, step, what=f"metrics of the evaluation at step {step}"):
        problems.append(f"metrics: {sink.last_problem}")
    with tempfile.TemporaryDirectory(prefix="dmdscale-grid-") as tmp:
        try:
            path = draw_grid(Path(tmp) / f"step_{step:07d}.png")
        except Exception as exc:
            problems.append(f"grid: {type(exc).__name__}: {exc}")
            _warn(f"sample grid of the evaluation at step {step} failed: {exc}")
        else:
            if not sink.log_artifact(path, GRID_ARTIFACT_DIR):
                problems.append(f"grid: {sink.last_problem}")
    return problems


def text_eval_spec(cfg: Any, prompts: list[str]) -> dict[str, Any]:
    """What the text families' final evaluation (SDFamily.evaluate) samples the student with:
    the held-out prompts, resolution, seed and trained timesteps, so a checkpoint's figures and
    the final ones form one curve."""
    return {"prompts": list(prompts), "resolution": cfg.data.resolution, "seed": cfg.train.seed,
            "timesteps": list(cfg.generator.timesteps)}


class TextCheckpointEvaluator:
    """The text families' checkpoint evaluation: the teacher pipeline with the student's
    scheduler and guidance-free UNet (as `dmdscale.families.sd.export.export_pipeline` writes it) around
    each checkpoint's weights, sampled as the final evaluation samples the exported student;
    FID and KID against held-out images (`fid_kind` "inception" or "clip"; None: none), CLIP
    score (with `clip_model`), and a prompt-captioned grid.

    The submitted state_dict is the generator's (TextConditionalUNet: keys prefixed `unet.`);
    with `lora` (the run's peft LoraConfig) the adapter is added first and merged per evaluation.
    """

    def __init__(self, teacher: str, family: str, spec: dict[str, Any], real_images: np.ndarray,
                 fid_kind: str | None, inception: str | None, clip_model: str | None, lora: Any,
                 tracking_uri: str | None, run_id: str | None, device: torch.device | str = "cpu"):
        from diffusers import DiffusionPipeline, LCMScheduler

        from dmdscale.eval.metrics import image_features
        from dmdscale.eval.text import fid_features, load_clip
        from dmdscale.export import sampling_call, student_scheduler
        from dmdscale.tracking import MlflowSink

        self.device = torch.device(device)
        self.spec, self.fid_kind, self.lora = spec, fid_kind, lora is not None
        scheduler = student_scheduler(LCMScheduler.load_config(teacher, subfolder="scheduler"), spec["timesteps"])
        self.call = sampling_call(spec["timesteps"], scheduler.config.num_train_timesteps)
        self.pipe = DiffusionPipeline.from_pretrained(teacher, scheduler=scheduler).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.unet = self.pipe.unet  # receives each checkpoint's weights
        if lora is not None:
            self.unet.add_adapter(lora)
        self.clip = load_clip(clip_model, device=self.device) if clip_model else None
        self.extractor = fid_features(fid_kind, inception=inception, clip=self.clip) if fid_kind else None
        # The held-out images' features once, not at every checkpoint.
        self.real_features = image_features(np.asarray(real_images), self.extractor) if self.extractor else None
        self.sink = MlflowSink(tracking_uri, run_id)  # its calls never raise

    def evaluate(self, step: int, state_dict: dict[str, torch.Tensor],
                 averages: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        """{step, fid_student, kid_student, clip_score_student (None where not computed),
        seconds}, `*_student_<name>` for each of `averages`; `error` if the evaluation raised,
        `tracking_error` if logging failed (as `CheckpointEvaluator.evaluate`)."""
        from dmdscale.eval.text import save_prompt_grid

        t0 = time.perf_counter()
        result: dict[str, Any] = {"step": int(step), "fid_student": None, "kid_student": None,
                                  "clip_score_student": None}
        try:
            images = self._figures("student", state_dict, result)
            for name, weights in (averages or {}).items():
                self._figures(f"student_{name}", weights, result)
        except Exception as exc:  # reported in the result; the actor goes on with the next one
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["seconds"] = time.perf_counter() - t0
            _warn(f"evaluation of the checkpoint at step {step} failed: {result['error']}")
            return result
        shown = min(16, len(images))
        figures = ", ".join(f"{k.split('_')[0].upper()} {result[k]:.2f}" for k in ("fid_student", "clip_score_student")
                            if result[k] is not None)
        title = f"step {step}" + (f": {figures}" if figures else "")
        problems = log_evaluation(self.sink, int(step), result, lambda path: save_prompt_grid(
            images[:shown], self.spec["prompts"][:shown], path, title=title))
        if problems:
            result["tracking_error"] = "; ".join(problems)
        result["seconds"] = time.perf_counter() - t0
        return result

    def _figures(self, who: str, state_dict: dict[str, torch.Tensor], result: dict[str, Any]) -> np.ndarray:
        from dmdscale.eval.metrics import image_features
        from dmdscale.eval.text import clip_score, fid_kid
        from dmdscale.export import guidance_free_unet, merged_unet
        from dmdscale.eval.text import pipeline_images

        self.unet.load_state_dict({k.removeprefix("unet."): v for k, v in state_dict.items()})
        self.pipe.register_modules(unet=guidance_free_unet(merged_unet(self.unet) if self.lora else self.unet))
        spec = self.spec
        images = pipeline_images(self.pipe, spec["prompts"], spec["resolution"], spec["seed"], **self.call)
        if self.extractor is not None:
            result[f"fid_{who}"], result[f"kid_{who}"] = fid_kid(image_features(images, self.extractor),
                                                                 self.real_features, self.fid_kind)
        if self.clip is not None:
            result[f"clip_score_{who}"] = clip_score(images, spec["prompts"], self.clip)
        return images


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

    Driver: `pool = EvaluationPool.start(...)` before training, `pool.drain()` after it, then
    `pool.shutdown()`. Rank 0: `pool.submit(step, state_dict)` at each checkpoint.
    """

    def __init__(self, actors: list[Any], ack_timeout: float | None = 60.0):
        self._actors = list(actors)
        self._next = 0
        self.ack_timeout = ack_timeout
        self.dropped: list[int] = []  # steps dropped from full queues (eval.max_queued), known after drain()

    @classmethod
    def start(cls, cfg: Any, build_generator: Callable[[], nn.Module], real_images: np.ndarray,
              extractor: str | nn.Module, tracking_uri: str | None, run_id: str | None, *,
              ready_timeout: float | None = 300.0, ack_timeout: float | None = 60.0) -> "EvaluationPool":
        """Create `cfg.eval.num_actors` actors (each `eval.actor_cpus` CPUs, and
        `eval.actor_gpus` of a GPU when `scale.use_gpu`) and wait up to `ready_timeout` s for
        them to build the student (a failing `build_generator` raises here, before training;
        actors still waiting for resources only give a warning).

        build_generator: picklable zero-argument callable returning the student architecture,
        e.g. functools.partial(load_unet, teacher_path). real_images: held-out uint8
        NHWC images, put into the object store once for all actors. extractor: the
        DigitClassifier or "inception", as for the final evaluation.
        """
        return cls.launch(cfg, CheckpointEvaluator, build_generator, eval_spec(cfg), np.ascontiguousarray(real_images),
                          extractor, tracking_uri, run_id, ready_timeout=ready_timeout, ack_timeout=ack_timeout)

    @classmethod
    def launch(cls, cfg: Any, make_evaluator: Callable[..., Any], *evaluator_args: Any,
               ready_timeout: float | None = 300.0, ack_timeout: float | None = 60.0) -> "EvaluationPool":
        """`start` for any evaluator: each actor builds `make_evaluator(*evaluator_args, device=...)`
        (an object with `evaluate(step, state_dict, averages)` and an MlflowSink `sink`, e.g.
        `TextCheckpointEvaluator`); numpy arrays among the arguments go into the object store once."""
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
        if ready_timeout is not None:
            ready, waiting = ray.wait([a.ready.remote() for a in actors], num_returns=len(actors),
                                      timeout=ready_timeout)
            ray.get(ready)  # raises if an actor could not build the student
            if waiting:
                _warn(f"{len(waiting)} of {len(actors)} evaluation actors did not start within "
                      f"{ready_timeout:g} s (waiting for resources?); checkpoints queue until they do")
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
