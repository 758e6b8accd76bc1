"""Text-to-image end to end: distil an SD1.5 or SDXL teacher (a diffusers pipeline) with DMD2.

Driver steps, in order: validate config, teacher folder and data (before any cluster work);
encode images and captions into VAE latents and text embeddings on a Ray Data actor pool (or
stream them from data.latent_cache); distil on Ray Train with DeepSpeed; assemble the student
as a diffusers pipeline folder; sample it against the teacher; write the run folder and the
MLflow run.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmdscale.checkpoint import RunJournal, parse_fail_at_step
from dmdscale.config import Config
from dmdscale.data import check_source, inspect_dataset, load_arrays, load_prompts, materialize_if_small
from dmdscale.latents import check_cache_target, latent_dataset
from dmdscale.models.sd import check_pipeline_folder
from dmdscale.plots import curves_from_log, plot_curves, save_grid
from dmdscale.tracking import Tracker
from dmdscale.train import (STUDENT_DIR, STUDENT_LORA, STUDENT_UNET_DIR, TRAIN_LOG, fit_on_ray, lora_config,
                            run_storage, source_paths)


def resolve_data(cfg: Config) -> tuple[str, str]:
    """(train path, held-out path), each checked for images and captions on the driver."""
    train, held_out = source_paths(cfg)
    for path in {train, held_out}:
        check_source(path, require_labels=False, require_prompts=True)
    return train, held_out


def assemble_student(cfg: Config, out: Path) -> Path:
    """The pipeline folder around the trained UNet (and LoRA weights), from the teacher's parts."""
    from safetensors.torch import load_file

    from dmdscale.export import export_pipeline

    lora = load_file(str(out / STUDENT_LORA)) if cfg.lora.enabled else None
    folder = export_pipeline(cfg.model.teacher, cfg.model.family, out / STUDENT_UNET_DIR,
                             cfg.generator.timesteps, out / STUDENT_DIR, lora_state_dict=lora,
                             lora_config=lora_config(cfg) if cfg.lora.enabled else None)
    shutil.rmtree(out / STUDENT_UNET_DIR)
    (out / STUDENT_LORA).unlink(missing_ok=True)
    return folder


def _generate(pipe: Any, prompts: list[str], resolution: int, seed: int, batch: int = 8, **call: Any) -> np.ndarray:
    """uint8 NHWC images from a diffusers pipeline, in fixed-seed chunks."""
    generator = torch.Generator().manual_seed(seed)
    images = [pipe(prompts[i:i + batch], height=resolution, width=resolution, generator=generator,
                   output_type="np", **call).images for i in range(0, len(prompts), batch)]
    return (np.concatenate(images) * 255).round().clip(0, 255).astype(np.uint8)


def evaluate_run(cfg: Config, student_dir: Path, prompts: list[str], real: np.ndarray, workdir: Path) -> dict[str, Any]:
    """Student samples from the exported folder exactly as a user loads it (no arguments), the
    teacher's at its many-step CFG sampler, the measured speedup, and FID where clean-fid's
    Inception weights are on disk (they cannot be downloaded offline)."""
    import dmdscale  # noqa: F401  (registers the student's scheduler class for from_pretrained)
    from diffusers import DiffusionPipeline

    from dmdscale.evaluate import compute_fid, inception_weights_path

    res, seed = cfg.data.resolution, cfg.train.seed
    # The driver's own GPU when it has one (`ray job submit --entrypoint-num-gpus 1`); at 1024 px
    # a CPU driver takes minutes per teacher image.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student = DiffusionPipeline.from_pretrained(str(student_dir)).to(device)
    teacher = DiffusionPipeline.from_pretrained(cfg.model.teacher).to(device)
    for pipe in (student, teacher):
        pipe.set_progress_bar_config(disable=True)
    teacher_call = {"num_inference_steps": cfg.eval.teacher_steps, "guidance_scale": cfg.loss.guidance_scale}
    timed = {}
    images = {}
    for name, pipe, call in (("student", student, {}), ("teacher", teacher, teacher_call)):
        t0 = time.perf_counter()
        images[name] = _generate(pipe, prompts, res, seed, **call)
        timed[name] = time.perf_counter() - t0
    metrics: dict[str, Any] = {"student_steps": len(cfg.generator.timesteps), "teacher_steps": cfg.eval.teacher_steps,
                               "sampling_speedup": timed["teacher"] / timed["student"],
                               "student_seconds_per_image": timed["student"] / len(prompts)}
    if inception_weights_path().is_file() and len(real) >= 2:
        for name in images:
            metrics[f"fid_{name}"] = compute_fid(images[name], real, "inception", workdir / f"fid_{name}")
    else:
        metrics["fid_skipped"] = f"clean-fid Inception weights not at {inception_weights_path()}"
    return metrics | {"_images": images["student"]}


def run(cfg: Config, out: Path, *, run_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """The whole run into `out` (metrics.json, samples, student/); `run_tags` on its MLflow run."""
    fail_at_step = parse_fail_at_step(os.environ.get("DMDSCALE_FAIL_AT_STEP"))
    out.mkdir(parents=True, exist_ok=True)
    check_pipeline_folder(cfg.model.teacher, cfg.model.family)
    train_path, held_out_path = resolve_data(cfg)
    check_cache_target(cfg, train_path)
    journal = RunJournal.at(*run_storage(cfg, out))
    resuming = journal.begin(cfg.flat()) == "resume"  # a changed config is an error, before any work
    if resuming:
        print(f"dmdscale: {journal.directory} holds an unfinished run of this config; resuming it")
    prompts = load_prompts(held_out_path, cfg.eval.num_samples)

    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    res = cfg.data.resolution
    stats = inspect_dataset(train_path, res, 3)
    train_data = latent_dataset(cfg, train_path)
    if cfg.data.latent_cache is None:  # else it streams from the cache: encoding happened once
        # On GPUs the encoders must be done before the trainers take the GPUs they hold.
        mode = "always" if cfg.scale.use_gpu else cfg.data.materialize
        train_data = materialize_if_small(train_data, stats.usable, res, 3, mode)

    resume_run_id = journal.read().get("mlflow_run_id") if resuming else None
    with Tracker(cfg.name, run_name=f"{cfg.model.family}-{out.name}", params=cfg.flat(),
                 resume_run_id=resume_run_id, tags=run_tags) as tracker:
        journal.note("mlflow_run_id", tracker.run_id)
        train_metrics = fit_on_ray(cfg, train_data, cfg.model.teacher, out, tracker, fail_at_step=fail_at_step)
        student_dir = assemble_student(cfg, out)
        journal.mark_finished()  # the student is out: a rerun starts afresh
        real = load_arrays(held_out_path, res, 3)[0][:len(prompts)]
        evals = evaluate_run(cfg, student_dir, prompts, real, out / "fid")
        images = evals.pop("_images")
        metrics = {**evals, **train_metrics, "skipped_rows": stats.skipped, "usable_rows": stats.usable}
        np.savez(out / "samples.npz", images=images, prompts=np.asarray(prompts))
        save_grid(images[:64], None, out / "samples.png", ncols=8, scale=1.2,
                  title=f"{len(cfg.generator.timesteps)}-step {cfg.model.family} student")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plot_curves(curves_from_log(json.loads((out / TRAIN_LOG).read_text()), "loss_"), out / "losses.png")
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                            step=cfg.train.max_steps)
        for name in ("metrics.json", "samples.png", "losses.png"):
            tracker.log_artifact(out / name)
        shutil.rmtree(out / "fid", ignore_errors=True)
    print(json.dumps(metrics, indent=2))
    return metrics
