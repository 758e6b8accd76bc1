"""The one driver: a whole run of any family into a run folder, read top to bottom.

Preflight (every cheap check before anything slow: data and labels, teacher, evaluation
settings, tracking server, the Ray cluster's size), the run journal (resume, refuse a changed
config, or only redo the evaluation of a run whose training finished), what the family builds
once (teacher, classifier), the MLflow run, training (on Ray Train, or in process), the final
evaluation, and the run folder: metrics.json, samples.npz, samples.png, losses.png, (with
checkpoint evaluations) checkpoint_evaluations.json, fid.png and (text families with a CLIP
model) clip.png, and student/. The journal marks the run finished only when all of that is written.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from dmdscale.config import Config
from dmdscale.contracts import Trained
from dmdscale.distributed.checkpoint.faults import parse_fail_at_step
from dmdscale.distributed.checkpoint.journal import RunJournal
from dmdscale.distributed.checkpoint.stages import check_init, check_init_fits
from dmdscale.families import resolve
from dmdscale.redact import scrub
from dmdscale.startup import Timeline
from dmdscale.tracking import Tracker, absolute_tracking_uri, check_tracking_server

TRAINED_RECORD = "trained.json"  # what training handed the evaluation: a rerun evaluates from it


def _final_point(cfg: Config, metrics: dict[str, Any], prefix: str = "fid_student") -> dict[str, Any]:
    """The final figures (`prefix`: FIDs, or the text families' CLIP scores) named as the checkpoint
    evaluations name them: there `fid_student` is the raw weights and `fid_student_<ema>` each
    average; the final evaluation calls the exported weights `fid_student` and the raw ones `fid_student_raw`."""
    final = {k: v for k, v in metrics.items() if k.startswith(prefix)}
    exported = metrics.get("student_weights", "raw")
    if exported != "raw" and f"{prefix}_raw" in final:
        final[f"{prefix}_{exported}"], final[prefix] = final[prefix], final.pop(f"{prefix}_raw")
    return {"step": cfg.train.max_steps, **final}


def _note_unreached_decays(cfg: Config) -> None:
    """Say when an EMA decay is never reached (a short run, or a long decay): its average is the
    warm-up's, the same as any other such decay's. A train.init stage continues an earlier
    stage's update count, so it is not judged from this stage's length."""
    from dmdscale.core.ema import unreached_decays, updates_to_reach, warmup_decay

    updates = math.ceil(cfg.train.max_steps / cfg.train.ttur_ratio)
    power = cfg.train.ema_power
    unreached = unreached_decays(cfg.train.ema_decays, updates, power) if cfg.train.init is None else []
    # Under train.ema_power the profile is the choice and an unreached cap is expected; two
    # such caps still give one average under two names.
    if unreached and (power is None or len(unreached) > 1):
        reach = ", ".join(f"{d:g} after {updates_to_reach(d, power)}" for d in unreached)
        warmup = "(1 + k) / (10 + k)" if power is None else f"(1 - 1 / (k + 1))^{power + 1:g} (train.ema_power)"
        print(f"dmdscale: train.ema_decays: this run makes {updates} generator updates and the EMA warm-up "
              f"{warmup} reaches {reach} updates; until then every update uses the warm-up's decay "
              f"({warmup_decay(updates - 1, power):.3f} at the last update): each such average is the "
              f"warm-up's own, the same weights whichever of these decays is named")


def _save_trained(trained: Trained, out: Path) -> None:
    record = {"student": str(trained.student), "metrics": trained.metrics, "evaluations": trained.evaluations}
    (out / TRAINED_RECORD).write_text(json.dumps(scrub(record), indent=1, default=float))


def _load_trained(out: Path) -> Trained:
    """The record of a run whose training finished (the log is the run folder's train_log.json)."""
    from dmdscale.config import ConfigError
    from dmdscale.distributed.worker import TRAIN_LOG

    record, log = out / TRAINED_RECORD, out / TRAIN_LOG
    data = json.loads(record.read_text()) if record.is_file() else None
    if data is None or not log.is_file() or not Path(data["student"]).exists():
        raise ConfigError(f"{out}: the journal says this run's training finished, but {record.name}, {log.name} or "
                          f"the student is missing from the run folder; rerun with the --out it trained into, "
                          f"or delete its storage folder to train again")
    return Trained(data["student"], data["metrics"], json.loads(log.read_text()), data["evaluations"])


def run(cfg: Config, out: Path, *, run_tags: dict[str, str] | None = None,
        on_evaluation: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The whole run into `out`; returns metrics.json's figures. A sweep trial tags its MLflow
    run (`run_tags`) and follows the checkpoint evaluations as they land (`on_evaluation`)."""
    from dmdscale.distributed.launch import run_storage
    from dmdscale.eval.plots import curves_from_log, plot_curves, plot_diagnostics

    timeline = Timeline()  # start-up phases, from the command's own start (metrics.json: startup_*_s)
    timeline.mark("imports")
    family = resolve(cfg)  # the one lookup by name: the family is handed down from here
    if cfg.regression.enabled:  # the regression stage: teacher ODE pairs, then regression, no DMD2
        from dmdscale.distributed.regression import run_regression_stage

        return run_regression_stage(cfg, family, out)
    fail_at_step = parse_fail_at_step(os.environ.get("DMDSCALE_FAIL_AT_STEP"))
    out.mkdir(parents=True, exist_ok=True)
    # A missing, truncated or other family's start fails here, before any work; how its weights
    # fit the teacher once the teacher's folder is known (a teacher trained here: after prepare).
    check_init(cfg.train.init, cfg.train.init_ema, cfg.model.family)
    inputs = family.preflight(cfg)  # data, labels, teacher, evaluation settings
    init_checked = check_init_fits(cfg.train.init, getattr(inputs, "teacher_path", ""))
    _note_unreached_decays(cfg)
    check_tracking_server(absolute_tracking_uri())
    # Runs on Ray keep a journal beside their checkpoints: a rerun resumes an unfinished run of
    # the same config (or only evaluates one whose training finished), and a changed config is
    # an error here, before any work.
    journal = RunJournal.at(*run_storage(cfg, out)) if family.trains_on_ray else None
    state = journal.begin(scrub(cfg.flat())) if journal is not None else "new"  # no credentials stored
    if state == "resume":
        journal.resume_point()  # every checkpoint damaged: one error naming each, before the cluster starts
    timeline.mark("preflight")
    if family.trains_on_ray:
        from dmdscale.distributed.cluster import connect, ensure_fits

        connect(log_to_driver=True)
        ensure_fits(cfg, family)
        timeline.mark("ray")
    if state == "resume":
        print(f"dmdscale: {journal.directory} holds an unfinished run of this config; resuming it")
    elif state == "evaluate":
        print(f"dmdscale: {journal.directory} holds a run of this config whose training finished; "
              f"evaluating it and writing the run folder")
    inputs = family.prepare(cfg, inputs)
    timeline.mark("prepare")
    if not init_checked:
        check_init_fits(cfg.train.init, getattr(inputs, "teacher_path", ""))

    resume_run_id = journal.read().get("mlflow_run_id") if state != "new" else None
    with Tracker(cfg.name, run_name=f"{family.run_label}-{out.name}", params=cfg.flat(),
                 resume_run_id=resume_run_id, tags=run_tags) as tracker:
        if journal is not None:
            journal.note("mlflow_run_id", tracker.run_id)
        if state == "evaluate":
            trained = _load_trained(out)
        else:
            trained = family.fit(cfg, inputs, out, tracker, fail_at_step=fail_at_step, on_evaluation=on_evaluation,
                                 timeline=timeline)
            trained = family.choose_export(cfg, inputs, trained)
            if journal is not None:
                _save_trained(trained, out)
                journal.mark_trained()  # an interrupted evaluation is redone, not the training
        evaluation = family.evaluate(cfg, inputs, trained, out / "fid")
        metrics = {**evaluation.metrics, **trained.metrics}

        family.write_model_card(cfg, inputs, trained, metrics)
        np.savez(out / "samples.npz", **evaluation.samples)
        family.draw_samples(cfg, evaluation.samples, metrics, out / "samples.png")
        # What is written or printed goes through scrub (credentials masked; the student folder,
        # which is published, through scrub(public=True) in its writers: dmdscale.export).
        (out / "metrics.json").write_text(json.dumps(scrub(metrics), indent=2))
        plot_curves(curves_from_log(trained.log, "loss_"), out / "losses.png")
        pictures = ["metrics.json", "samples.png", "losses.png"]
        if plot_diagnostics(trained.log, out / "diagnostics.png") is not None:
            pictures.append("diagnostics.png")
        if trained.evaluations is not None:  # FID over training: the checkpoints, then the final figure
            (out / "checkpoint_evaluations.json").write_text(json.dumps(scrub(trained.evaluations), indent=1,
                                                                        default=float))
            plot_curves(curves_from_log([*trained.evaluations, _final_point(cfg, metrics)], "fid_student"),
                        out / "fid.png")
            pictures.append("fid.png")
            if any(r.get("clip_score_student") is not None for r in trained.evaluations):  # text families
                plot_curves(curves_from_log([*trained.evaluations, _final_point(cfg, metrics, "clip_score_student")],
                                            "clip_score_student"), out / "clip.png")
                pictures.append("clip.png")
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                            step=cfg.train.max_steps)
        for name in pictures:
            tracker.log_artifact(out / name)
        shutil.rmtree(out / "fid", ignore_errors=True)
        if journal is not None:
            journal.mark_finished()  # everything promised is written: a rerun starts afresh
    print(json.dumps(scrub(metrics), indent=2))
    return metrics
