"""The embedded default end to end: distil a class-conditional digits teacher.

Driver steps, in order: validate data and config (before any cluster work); build the digits
Parquet; train (or load cached) the FID classifier and the teacher; distil on Ray Train with
DeepSpeed over a Ray Data stream; evaluate teacher and student with clean-fid; write the run
folder and the MLflow run.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dmdscale.checkpoint import RunJournal, parse_fail_at_step
from dmdscale.config import Config
from dmdscale.data import (DataError, check_source, inspect_dataset, load_arrays,
                           materialize_if_small, read_dataset)
from dmdscale.evalpool import EvaluationPool, eval_spec
from dmdscale.evaluate import class_accuracy, compute_fid, generate, load_or_train_classifier, sample_student
from dmdscale.generator import sample, teacher_sample
from dmdscale.models.unet2d import ClassConditionalUNet, load_unet_teacher, tiny_unet_config
from dmdscale.plots import curves_from_log, plot_curves, save_grid
from dmdscale.teacher import load_or_train_teacher
from dmdscale.tracking import Tracker
from dmdscale.train import STUDENT_DIR, TRAIN_LOG, fit_on_ray, run_storage, source_paths, uses_eval_actors


def resolve_data(cfg: Config) -> tuple[str, str]:
    """(train path, held-out path), validated on the driver before any cluster work."""
    train, held_out = source_paths(cfg)
    for path in {train, held_out}:
        check_source(path, require_labels=True)  # class-conditional: labels are required
    return train, held_out


def resolve_teacher(cfg: Config, images: np.ndarray, labels: np.ndarray) -> Path:
    """The teacher's diffusers folder: the user's, or one trained here on the train split
    (cached by its config and data, so later runs load it with from_pretrained at once)."""
    if cfg.model.teacher != "train":
        return Path(cfg.model.teacher)
    tt = cfg.teacher_training
    return load_or_train_teacher(
        Path(cfg.cache_dir).expanduser() / "teachers", images, labels,
        tiny_unet_config(cfg.data.resolution, cfg.data.channels, cfg.data.num_classes, tt.width),
        steps=tt.steps, batch_size=tt.batch_size, lr=tt.lr, prediction_type=tt.prediction_type,
        seed=cfg.train.seed)


@dataclasses.dataclass
class Inputs:
    """What a digits run needs before training: data, the FID classifier, the teacher."""

    train_path: str
    held_out_path: str
    train: tuple[np.ndarray, np.ndarray]  # (uint8 NHWC images, labels)
    held_out: tuple[np.ndarray, np.ndarray]
    classifier: Any
    teacher_path: Path


def prepare(cfg: Config) -> Inputs:
    """Load the data; train or load (cached under cache_dir) the classifier and the teacher.
    A sweep calls this once before its trials, so they all find them cached."""
    res, ch = cfg.data.resolution, cfg.data.channels
    train_path, held_out_path = resolve_data(cfg)
    train_images, train_labels, _ = load_arrays(train_path, res, ch, require_labels=True)
    eval_images, eval_labels, _ = load_arrays(held_out_path, res, ch, require_labels=True)
    if len(train_images) == 0 or len(eval_images) == 0:
        raise DataError(f"no usable images in {train_path if len(train_images) == 0 else held_out_path}")
    classifier = load_or_train_classifier(Path(cfg.cache_dir).expanduser() / "classifiers", train_images,
                                          train_labels, steps=cfg.eval.classifier_steps)
    return Inputs(train_path, held_out_path, (train_images, train_labels), (eval_images, eval_labels),
                  classifier, resolve_teacher(cfg, train_images, train_labels))


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def fid_extractor(cfg: Config, classifier: Any) -> Any:
    """FID features: the digit classifier, or clean-fid's Inception (local weights)."""
    return classifier if cfg.eval.feature_extractor == "classifier" else "inception"


def evaluate_run(cfg: Config, teacher: ClassConditionalUNet, student: ClassConditionalUNet,
                 held_out: tuple[np.ndarray, np.ndarray], train_images: np.ndarray, classifier,
                 workdir: Path) -> dict[str, Any]:
    """FID against held-out real images and class accuracy, for the teacher at its many-step
    sampler and at 1 step, and for the student at its steps; plus the measured speedup."""
    spec = eval_spec(cfg)  # the checkpoint evaluations sample with the same spec
    n, (c, r, _), labels = cfg.eval.num_samples, spec["shape"], spec["labels"]
    gs, steps = cfg.loss.guidance_scale, cfg.generator.timesteps

    def teacher_many(z, y):
        return teacher_sample(teacher, z, cfg.eval.teacher_steps, y, gs)

    def teacher_one(z, y):
        return teacher_sample(teacher, z, 1, y, gs)

    def student_fn(z, y):
        return sample(student, student.schedule, z, steps, y)

    extractor = fid_extractor(cfg, classifier)
    real = held_out[0]
    images = {name: generate(fn, labels, spec["shape"], spec["seed"], desc=f"evaluate: {name}")
              for name, fn in [("teacher", teacher_many), ("teacher_1step", teacher_one)]}
    images["student"] = sample_student(student, steps, labels, spec["shape"], spec["seed"], desc="evaluate: student")
    metrics: dict[str, Any] = {
        "teacher_steps": cfg.eval.teacher_steps,
        "student_steps": len(steps),
    }
    for name, imgs in images.items():
        metrics[f"fid_{name}"] = compute_fid(imgs, real, extractor, workdir / f"fid_{name}")
        metrics[f"class_accuracy_{name}"] = class_accuracy(classifier, imgs, labels)
    # The floor of this FID: as many real training images as samples, against the same held-out set.
    metrics["fid_real_train"] = compute_fid(train_images[:n], real, extractor, workdir / "fid_real")
    # Speed: the same batch through both samplers (after a warm-up call each).
    z = torch.randn(min(n, 256), c, r, r)
    y = torch.from_numpy(labels[: len(z)]).long()
    for fn in (teacher_many, student_fn):
        fn(z[:2], y[:2])
    metrics["sampling_speedup"] = _timed(teacher_many, z, y) / _timed(student_fn, z, y)
    return metrics | {"_images": images["student"], "_labels": labels}


def _fit_watching(fit: Callable[[], dict[str, Any]], eval_pool: EvaluationPool,
                  on_evaluation: Callable[[dict[str, Any]], None],
                  poll_seconds: float = 2.0) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`fit()` in a thread while this one hands each finished checkpoint evaluation to
    `on_evaluation` as it lands (a sweep trial reports it to Tune, whose scheduler may stop
    the trial on it); then waits for the rest. Returns fit's metrics and every evaluation."""
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


def distil_on_ray(cfg: Config, train_path: str, teacher_path: Path, out: Path, tracker: Tracker,
                  eval_setup: tuple[np.ndarray, Any] | None = None, fail_at_step: int | None = None,
                  on_evaluation: Callable[[dict[str, Any]], None] | None = None) -> tuple[Path, dict]:
    """The digits rows as a Ray Data stream, checkpoints evaluated on separate actors meanwhile,
    and DMD2 on Ray Train (`fit_on_ray`). Returns the student folder and the final metrics.
    `on_evaluation(result)` receives each checkpoint evaluation as soon as it is finished."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    res, ch = cfg.data.resolution, cfg.data.channels
    stats = inspect_dataset(train_path, res, ch, require_labels=True)
    train_data = materialize_if_small(
        read_dataset(train_path, res, ch, require_labels=True, num_cpus=min(1.0, cfg.scale.data_cpus)),
        stats.usable, res, ch, cfg.data.materialize)
    eval_pool = None
    if eval_setup is not None and uses_eval_actors(cfg):
        real_images, extractor = eval_setup
        eval_pool = EvaluationPool.start(cfg, functools.partial(load_unet_teacher, str(teacher_path)),
                                         real_images, extractor, tracker.tracking_uri, tracker.run_id)
    def fit() -> dict[str, Any]:
        return fit_on_ray(cfg, train_data, teacher_path, out, tracker, eval_pool, fail_at_step)

    try:
        if eval_pool is not None and on_evaluation is not None:
            train_metrics, evaluations = _fit_watching(fit, eval_pool, on_evaluation)
        else:
            train_metrics = fit()
            evaluations = eval_pool.drain() if eval_pool is not None else []
    finally:
        if eval_pool is not None:
            eval_pool.shutdown()
    (out / "checkpoint_evaluations.json").write_text(json.dumps(evaluations, indent=1, default=float))  # for fid.png
    RunJournal.at(*run_storage(cfg, out)).mark_finished()  # the student is out: a rerun starts afresh
    return out / STUDENT_DIR, train_metrics | {"skipped_rows": stats.skipped, "usable_rows": stats.usable,
                                               "checkpoint_evaluations": len(evaluations)}


def run(cfg: Config, out: Path, *, run_tags: dict[str, str] | None = None,
        on_evaluation: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The whole run into `out` (metrics.json, samples, student/). A sweep trial tags its
    MLflow run (`run_tags`) and follows the checkpoint evaluations (`on_evaluation`)."""
    fail_at_step = parse_fail_at_step(os.environ.get("DMDSCALE_FAIL_AT_STEP"))
    out.mkdir(parents=True, exist_ok=True)
    resolve_data(cfg)
    journal = RunJournal.at(*run_storage(cfg, out))
    resuming = journal.begin(cfg.flat()) == "resume"  # a changed config is an error, before any work
    if resuming:
        print(f"dmdscale: {journal.directory} holds an unfinished run of this config; resuming it")
    inputs = prepare(cfg)
    train_path, classifier, teacher_path = inputs.train_path, inputs.classifier, inputs.teacher_path
    train_images, (eval_images, eval_labels) = inputs.train[0], inputs.held_out
    teacher = load_unet_teacher(teacher_path)

    resume_run_id = journal.read().get("mlflow_run_id") if resuming else None
    with Tracker(cfg.name, run_name=f"digits-{out.name}", params=cfg.flat(), resume_run_id=resume_run_id,
                 tags=run_tags) as tracker:
        journal.note("mlflow_run_id", tracker.run_id)
        student_dir, train_metrics = distil_on_ray(cfg, train_path, teacher_path, out, tracker,
                                                   (eval_images, fid_extractor(cfg, classifier)), fail_at_step,
                                                   on_evaluation)
        student = load_unet_teacher(student_dir)
        evals = evaluate_run(cfg, teacher, student, (eval_images, eval_labels), train_images, classifier,
                             out / "fid")
        images, labels = evals.pop("_images"), evals.pop("_labels")
        metrics = {
            **evals,
            "classifier_accuracy_held_out": class_accuracy(classifier, eval_images, eval_labels),
            **train_metrics,
        }
        np.savez(out / "samples.npz", images=images, labels=labels.astype(np.int64))
        shown = np.concatenate([np.flatnonzero(labels == k)[:10] for k in range(cfg.data.num_classes)])
        save_grid(images[shown], labels[shown], out / "samples.png",
                  title=f"{len(cfg.generator.timesteps)}-step student (FID {metrics['fid_student']:.2f}, "
                        f"teacher {cfg.eval.teacher_steps} steps {metrics['fid_teacher']:.2f})")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        # From the run folder, not MLflow (which may have missed some): what rank 0 logged, by step.
        plot_curves(curves_from_log(json.loads((out / TRAIN_LOG).read_text()), "loss_"), out / "losses.png")
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                            step=cfg.train.max_steps)
        # FID over training: the evaluation actors' checkpoints, then the final figure.
        evaluations = json.loads((out / "checkpoint_evaluations.json").read_text())
        final = {"step": cfg.train.max_steps, "fid_student": metrics["fid_student"]}
        plot_curves(curves_from_log([*evaluations, final], "fid_student"), out / "fid.png")
        for name in ("metrics.json", "samples.png", "losses.png", "fid.png"):
            tracker.log_artifact(out / name)
        shutil.rmtree(out / "fid", ignore_errors=True)
    print(json.dumps(metrics, indent=2))
    return metrics
