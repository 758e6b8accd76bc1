"""The regression stage (`regression.enabled`), a whole run into a run folder: the teacher's ODE
pairs on a Ray actor pool (`ode_pairs`), then the generator trained on them on Ray Train +
DeepSpeed, streamed from the pair shards by Ray Data.

The run folder gets stage/generator.safetensors (what the next stage's `train.init` starts
from), train_log.json, losses.png and metrics.json. No student is exported and nothing is
evaluated here: the DMD2 stage that starts from it does both.
"""
from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from dmdscale.config import Config
from dmdscale.contracts import Family
from dmdscale.distributed.checkpoint.stages import STAGE_DIR, check_init, check_init_fits, save_stage
from dmdscale.distributed.ode_pairs import PAIR_INFO_COLUMNS
from dmdscale.redact import scrub

STAGE_NAME = "regression"  # the Ray Train run's name: <name>-<out folder>-regression


def regression_generator(cfg: Config, family: Family, teacher_path: str) -> torch.nn.Module:
    """The regression stage's generator on the host: a trainable copy of the teacher (adapted
    by the family, e.g. LoRA), or train.init's generator."""
    from dmdscale.distributed.worker import _load_part

    generator = copy.deepcopy(family.load_teacher(cfg, teacher_path)).train().requires_grad_(True)
    family.adapt_generator(cfg, generator)
    _load_part(generator, cfg, "generator")
    return generator


def regression_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: the generator (a copy of the teacher, or train.init's) under a
    DeepSpeed engine, trained by `RegressionStep`; rank 0 logs and writes the stage."""
    import ray.train
    import ray.train.torch

    from dmdscale.core.loop import train_loop
    from dmdscale.core.regression import RegressionStep, regression_distance
    from dmdscale.distributed.checkpoint.state import DataPosition
    from dmdscale.distributed.engine import DeepSpeedOptimizedModule
    from dmdscale.distributed.resources import cpu_threads
    from dmdscale.distributed.worker import TRAIN_LOG, TRAIN_METRICS, all_ranks_agree, shard_batches
    from dmdscale.tracking import MlflowSink

    cfg = Config.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg, ctx.get_local_world_size()))
    torch.manual_seed(cfg.train.seed)
    generator = regression_generator(cfg, config["family"], config["teacher_path"]).to(device)
    vae = None
    if cfg.regression.metric == "lpips":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(config["teacher_path"], subfolder="vae").to(device)
    micro = cfg.train.batch_size // world
    engine = DeepSpeedOptimizedModule(generator, cfg.train, cfg.scale, micro, role="generator")
    distance = regression_distance(cfg, vae)
    if isinstance(distance, torch.nn.Module):
        distance = distance.to(device)
    step_fn = RegressionStep(cfg, engine, distance, sync_flag=all_ranks_agree, device=device)
    sink = MlflowSink(config.get("tracking_uri"), config.get("run_id")) if rank == 0 else None
    logged: list[dict[str, float]] = []

    def on_step_end(metrics: dict[str, float], step: int) -> None:
        if step % cfg.train.log_every == 0 and step != cfg.train.max_steps - 1:
            report = {**metrics, "step": step}
            if sink is not None:
                sink.log_metrics(report, step)
                logged.append(report)
            ray.train.report(report)  # every rank, at the same steps: reports are collective

    batches = shard_batches(ray.train.get_dataset_shard("train"), micro, device, cfg.scale.shuffle_buffer,
                            cfg.train.seed, DataPosition(), convert=dict)  # RegressionStep reads the pair columns
    result = train_loop(step_fn, batches, cfg.train.max_steps, max_nonfinite_steps=cfg.train.max_nonfinite_steps,
                        log_every=cfg.train.log_every, on_step_end=on_step_end, progress=rank == 0)
    last = {**result.history[-1], "step": cfg.train.max_steps - 1}
    if sink is not None:
        sink.log_metrics(last, last["step"])
        logged.append(last)
    final = {"steps_completed": len(result.history), "train_seconds": result.seconds,
             "nonfinite_steps": result.nonfinite_steps, "final_loss_regression": last["loss_regression"],
             "first_loss_regression": result.history[0]["loss_regression"]}
    weights = engine.full_state_dict()  # collective under ZeRO-3
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            save_stage(tmp, {"generator": weights})
            (Path(tmp) / TRAIN_METRICS).write_text(json.dumps(final))
            (Path(tmp) / TRAIN_LOG).write_text(json.dumps(logged, default=float))
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)


def fit_regression(cfg: Config, family: Family, pairs: Path, teacher_path: str, out: Path, tracker: Any) -> dict[str, Any]:
    """`regression_worker` on Ray Train over the pair shards (Ray Data), through the launcher DMD2
    uses (`launch.fit_on_ray`, a run of its own beside the DMD2 runs' names); copies stage/ and
    the log into `out`. A failed attempt starts the stage afresh: it is short next to the pairs,
    which a rerun does not remake."""
    import ray.data

    from dmdscale.distributed.launch import fit_on_ray
    from dmdscale.distributed.worker import TRAIN_LOG

    # The tensors only: noise, target and the text embeddings (whichever the family has).
    data = ray.data.read_parquet(str(pairs), file_extensions=["parquet"]).drop_columns(list(PAIR_INFO_COLUMNS))
    return fit_on_ray(cfg, family, data, teacher_path, out, tracker, (STAGE_DIR, TRAIN_LOG),
                      worker=regression_worker, stage=STAGE_NAME)


def run_regression_stage(cfg: Config, family: Family, out: Path) -> dict[str, Any]:
    """The whole stage into `out` (see the module docstring); returns metrics.json's figures."""
    from dmdscale.core.regression import load_lpips
    from dmdscale.distributed.cluster import connect, ensure_fits
    from dmdscale.distributed.ode_pairs import check_pairs_target, make_pairs, pairs_folder, pairs_key
    from dmdscale.distributed.worker import TRAIN_LOG
    from dmdscale.eval.plots import curves_from_log, plot_curves
    from dmdscale.tracking import Tracker, absolute_tracking_uri, check_tracking_server

    out.mkdir(parents=True, exist_ok=True)
    check_init(cfg.train.init, cfg.train.init_ema, cfg.model.family)  # a missing or wrong start fails here
    inputs = family.preflight(cfg)  # teacher folder, prompts (images optional)
    check_init_fits(cfg.train.init, str(inputs.teacher_path))  # its weights fit the teacher's generator
    folder = pairs_folder(cfg, out)
    check_pairs_target(folder, pairs_key(cfg, inputs.train_path))
    if cfg.regression.metric == "lpips":
        load_lpips(cfg.regression.lpips_weights)  # a missing or wrong file fails here, before any work
    check_tracking_server(absolute_tracking_uri())
    connect(log_to_driver=True)
    ensure_fits(cfg, family)
    with Tracker(cfg.name, run_name=f"{family.run_label}-{STAGE_NAME}-{out.name}", params=cfg.flat()) as tracker:
        metrics = make_pairs(cfg, family, inputs.train_path, folder)
        metrics |= fit_regression(cfg, family, folder, str(inputs.teacher_path), out, tracker)
        (out / "metrics.json").write_text(json.dumps(scrub(metrics), indent=2))
        plot_curves(curves_from_log(json.loads((out / TRAIN_LOG).read_text()), "loss_"), out / "losses.png")
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                            step=cfg.train.max_steps)
        for name in ("metrics.json", "losses.png"):
            tracker.log_artifact(out / name)
    print(json.dumps(metrics, indent=2))
    return metrics
