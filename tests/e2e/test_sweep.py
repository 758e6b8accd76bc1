"""Sweeps: the search space, scheduler and trial sizing (pure logic), and a real quick sweep
on Ray Tune + Ray Train with a diverging trial, interrupted and resumed, logged to MLflow."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from dmdscale.config import ConfigError, build_config, load_config
from dmdscale.sweep import (
    best_row,
    check_sweep,
    concurrent_trials,
    current_values,
    results_table,
    scheduler,
    search_space,
    searcher,
    trial_config,
    trial_resources,
)

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "pipelines" / "configs" / "digits.yaml"


def digits(overrides: dict | None = None, quick: bool = True):
    return load_config(DIGITS, overrides, quick=quick)


def with_sweep(cfg, **sweep):
    tree = cfg.model_dump(mode="json")
    tree["sweep"] |= sweep
    return build_config(tree)


def test_the_default_space_is_the_gan_weights_the_update_ratio_and_the_learning_rate():
    cfg = digits()
    assert set(cfg.sweep.space) == {"loss.gan_generator_weight", "loss.gan_critic_weight", "train.ttur_ratio",
                                    "train.lr"}
    check_sweep(cfg)
    assert current_values(cfg) == {"loss.gan_generator_weight": 3e-3, "loss.gan_critic_weight": 1e-2,
                                   "train.ttur_ratio": 5, "train.lr": 5e-4}
    assert cfg.sweep.num_samples == 3  # --quick: a 2-4 trial sweep
    assert "sweep.search" not in cfg.flat()  # a run's params do not carry the sweep's settings


def test_search_space_maps_values_and_ranges_to_tune_samplers():
    from ray.tune.search.sample import Categorical, Float, Integer

    cfg = with_sweep(digits(), space={"train.lr": {"low": 1e-4, "high": 1e-3, "log": True},
                                      "train.ttur_ratio": {"values": [1, 5]},
                                      "train.max_steps": {"low": 10, "high": 30, "integer": True}})
    space = search_space(cfg)
    assert isinstance(space["train.lr"], Float) and space["train.lr"].lower == 1e-4
    assert isinstance(space["train.ttur_ratio"], Categorical) and space["train.ttur_ratio"].categories == [1, 5]
    assert isinstance(space["train.max_steps"], Integer)
    samples = [space["train.lr"].sample() for _ in range(200)]
    assert all(1e-4 <= s <= 1e-3 for s in samples)
    assert sum(s < math.sqrt(1e-4 * 1e-3) for s in samples) > 60  # log-uniform: half below the geometric mean
    grid = search_space(with_sweep(digits(), search="grid", space={"train.ttur_ratio": {"values": [1, 5]}}))
    assert grid["train.ttur_ratio"] == {"grid_search": [1, 5]}


@pytest.mark.parametrize("sweep, message", [
    ({"space": {"train.lr": {"values": [1e-4, -1.0]}}}, r"sweep.space.train.lr: value -1.0 .*train.lr"),
    ({"space": {"train.typo": {"values": [1]}}}, r"sweep.space.train.typo: .*not a known key"),
    ({"search": "grid", "space": {"train.lr": {"low": 1e-4, "high": 1e-3}}}, r"sweep.space.train.lr: grid search needs"),
    ({"space": {}}, r"sweep.space: no keys"),
])
def test_a_bad_sweep_is_refused_naming_the_key_before_any_cluster_work(sweep, message):
    with pytest.raises(ConfigError, match=message):
        check_sweep(with_sweep(digits(), **sweep))


def test_bad_search_dimensions_and_early_stopping_without_evaluations_are_refused():
    with pytest.raises(ConfigError, match=r"sweep.space.train.lr.*low < high"):
        build_config({"sweep": {"space": {"train.lr": {"low": 1e-3, "high": 1e-4}}}})
    with pytest.raises(ConfigError, match=r"sweep.space.train.lr.*either values"):
        build_config({"sweep": {"space": {"train.lr": {"values": [1e-3], "low": 1e-4, "high": 1e-2}}}})
    with pytest.raises(ConfigError, match=r"sweep.early_stopping: asha .*eval.during_training"):
        check_sweep(digits({"eval.during_training": False}))
    check_sweep(with_sweep(digits({"eval.during_training": False}), early_stopping="none"))


def test_trial_config_applies_the_sampled_values_and_validates_them():
    cfg = trial_config(digits(), {"train.lr": 2e-4, "loss.gan_critic_weight": 0.05})
    assert cfg.train.lr == 2e-4 and cfg.loss.gan_critic_weight == 0.05
    assert cfg.train.max_steps == 20  # the quick base config stays
    with pytest.raises(ConfigError, match="train.ttur_ratio"):
        trial_config(digits(), {"train.ttur_ratio": 0})


def test_local_paths_are_made_absolute_for_trials_in_other_working_directories(tmp_path, monkeypatch):
    from dmdscale.sweep import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train").mkdir()  # a folder named like the "train a teacher" keyword stays a keyword
    cfg = absolute_paths(digits({"cache_dir": "cache", "data.eval_path": "held_out.parquet"}))
    assert cfg.cache_dir == str(tmp_path / "cache") and cfg.data.eval_path == str(tmp_path / "held_out.parquet")
    assert cfg.data.path == "digits" and cfg.model.teacher == "train"
    hub = absolute_paths(digits({"model.teacher": "stabilityai/sdxl-turbo"}))
    assert hub.model.teacher == "stabilityai/sdxl-turbo"  # not a local folder: a hub id


def test_asha_follows_the_checkpoint_evaluations_by_training_step():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    cfg = digits()
    asha = scheduler(cfg)
    assert isinstance(asha, ASHAScheduler)
    assert asha._time_attr == "step" and asha._max_t == cfg.train.max_steps
    # One rung, at the grace period of two checkpoints (10 of 20 quick steps; 10 x 3 > 20).
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [2 * cfg.train.checkpoint_every]
    assert isinstance(scheduler(with_sweep(cfg, early_stopping="none")), FIFOScheduler)


def test_concurrent_trials_are_sized_from_the_cluster():
    cfg = digits()  # 1 CPU worker + 1 CPU for Ray Data + a 0.25-CPU evaluation actor
    assert trial_resources(cfg) == {"CPU": 2.3}  # and a sliver for the trial's own driver
    assert concurrent_trials(cfg, {"CPU": 2.0}) == 1  # a 2-core box still runs one at a time
    assert concurrent_trials(cfg, {"CPU": 16.0}) == 6  # 16 // 2.3
    gpu = digits({"scale.use_gpu": True, "scale.num_workers": 2})
    assert trial_resources(gpu)["GPU"] == 2.0
    assert concurrent_trials(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    assert concurrent_trials(with_sweep(gpu, max_concurrent_trials=2), {"CPU": 64.0, "GPU": 8.0}) == 2


def _result(trial, config, history, error=None, state=None):
    result = SimpleNamespace(metrics=dict(history[-1], trial_id=trial) if history else {},
                             metrics_dataframe=pd.DataFrame(history), config=config, error=error)
    return trial, state or ("ERROR" if error else "TERMINATED"), result


def test_results_table_ranks_finished_trials_and_keeps_failures():
    cfg = with_sweep(digits(), space={"train.lr": {"values": [1e-4, 5e-4, 1.0]}})
    grid = [
        _result("a", {"train.lr": 1e-4}, [{"fid_student": 40.0, "step": 5, "final": 0},
                                           {"fid_student": 30.0, "step": 20, "final": 1}]),
        _result("b", {"train.lr": 5e-4}, [{"fid_student": 25.0, "step": 5, "final": 0},
                                           {"fid_student": 20.0, "step": 20, "final": 1}]),
        _result("c", {"train.lr": 1.0}, [{"fid_student": 90.0, "step": 5, "final": 0}],
                error=RuntimeError("NonFiniteLoss: 10 consecutive non-finite steps")),
        _result("d", {"train.lr": 2e-4}, [{"fid_student": 60.0, "step": 10, "final": 0}]),
        _result("e", {"train.lr": 3e-4}, [], state="RUNNING"),
    ]
    table = results_table(grid, cfg)
    assert list(table["trial"]) == ["b", "a", "d", "e", "c"]
    assert list(table["status"]) == ["finished", "finished", "stopped early", "interrupted", "error"]
    assert table.loc[0, "best_checkpoint_fid_student"] == 25.0
    assert "non-finite" in table.loc[4, "error"] and table.loc[3, "error"] == ""
    best = best_row(table, cfg)
    assert best["trial"] == "b" and best["train.lr"] == 5e-4


@pytest.mark.parametrize("search", ["grid", "random", "bayesian"])
def test_every_searcher_holds_the_trials_to_what_the_cluster_fits(search):
    cfg = with_sweep(digits(), search=search, space={"train.ttur_ratio": {"values": [1, 5]}})
    algorithm = searcher(cfg, 2)
    # Tune ignores TuneConfig.max_concurrent_trials for a BasicVariantGenerator instance.
    limit = getattr(algorithm, "max_concurrent", None) or getattr(algorithm, "_max_concurrent", None)
    assert limit == 2


def _tune_reports(out: Path, trial_index: int) -> list[dict]:
    """What trial `trial_index` reported to Tune so far (its result.json lines)."""
    found = sorted((out / "tune").glob(f"run_trial_*_{trial_index:05d}_*/result.json"))
    if not found:
        return []
    return [json.loads(line) for line in found[-1].read_text().splitlines() if line.strip()]


def _checkpointed(trial_dir: Path) -> bool:
    """Ray Train registered a checkpoint of the trial's run (its checkpoint manager's record)."""
    return any("checkpoint_" in f.read_text() for f in trial_dir.glob("ray/*/checkpoint_manager_snapshot.json"))


@pytest.mark.slow
def test_a_quick_sweep_survives_a_diverging_trial_and_ctrl_c_and_logs(tmp_path, mlflow_server, digits_cache):
    """Two grid trials on quick digits with ASHA on, logged to a real `mlflow server`: a learning
    rate that diverges to NaN (an error; the sweep goes on), then a good one, interrupted with
    Ctrl-C once its first checkpoint exists, which the same command then resumes from that
    checkpoint. (ASHA stopping a trial is shown in bench/README.md's quick sweep; its rungs are
    tested above.)"""
    config = tmp_path / "sweep.yaml"
    tree = yaml.safe_load(DIGITS.read_text())
    tree["sweep"] = {"search": "grid", "space": {"train.lr": {"values": [1e30, 5e-4]}}}
    config.write_text(yaml.safe_dump(tree))
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "pipelines" / "sweep.py"), "--config", str(config), "--quick", "--out", str(out),
           f"cache_dir={digits_cache}", "sweep.num_samples=1", "train.max_failures=0", "train.max_nonfinite_steps=2",
           # 30 steps after the first checkpoint: Ctrl-C must land before the run ends (stopping
           # the trial's actors takes a few seconds, in which training goes on).
           "train.max_steps=40", "train.checkpoint_every=10", "eval.num_samples=100", "eval.teacher_steps=2"]
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while not (good := next((out / "trials").glob("*_00001"), None)) or not _checkpointed(good):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the second trial made no checkpoint"
            time.sleep(0.5)
        first.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves its state and the driver stops
        assert first.wait(timeout=180) != 0
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    assert "interrupted" in (tmp_path / "first.log").read_text()
    assert not (good / "metrics.json").exists()  # it really stopped mid-run

    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming the sweep" in second.stdout

    table = pd.read_csv(out / "results.csv")
    assert len(table) == 2
    finished, diverged = table.iloc[0], table.iloc[1]
    assert finished["status"] == "finished" and finished["train.lr"] == 5e-4 and 0 < finished["fid_student"] < 400
    # The interrupted trial went on from its checkpoint, not from step 0.
    m = json.loads((good / "metrics.json").read_text())
    resumed_at = m["resumed_from_step"]
    assert resumed_at in (10, 20, 30) and m["steps_completed"] == 40 and m["restarts"] == 1, m
    logged = [s for s in range(40) if s % 5 == 0 or (s + 1) % 10 == 0 or s == 39]  # log_every 5, checkpoints
    assert [r["step"] for r in json.loads((good / "train_log.json").read_text())] == logged
    assert diverged["status"] == "error" and "non-finite" in diverged["error"]
    # Every checkpoint evaluation after the resume reached Tune (and so ASHA) before the final figure.
    reports = _tune_reports(out, 1)
    evaluated = [r["step"] for r in reports if r.get("final") == 0]
    assert evaluated == [s for s in (10, 20, 30) if s > resumed_at] and reports[-1]["step"] == 40
    best = load_config(out / "best_config.yaml")  # a config the digits pipeline takes as it is
    assert best.train.lr == 5e-4 and best.model.family == "unet2d"
    assert (out / "sweep.png").stat().st_size > 10_000
    assert "best trial" in second.stdout

    # MLflow on the server: the sweep's run with the table, and a run per trial under it.
    client = MlflowClient(mlflow_server.uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    sweeps = [r for r in runs if r.info.run_name == f"sweep-{out.name}"]
    assert len(sweeps) == 1 and sweeps[0].info.status == "FINISHED"
    assert sweeps[0].data.metrics["best_fid_student"] == pytest.approx(finished["fid_student"])
    assert {a.path for a in client.list_artifacts(sweeps[0].info.run_id)} >= {"results.csv", "best_config.yaml",
                                                                               "sweep.png"}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweeps[0].info.run_id]
    assert sorted(r.data.tags["dmdscale.trial"] for r in children) == sorted(table["trial"])  # one run each
    trials = {r.data.tags["dmdscale.trial"]: r for r in children}
    assert trials[diverged["trial"]].info.status == "FAILED"
    resumed = trials[finished["trial"]]  # one run across both drivers: the whole loss curve, the FID curve
    assert resumed.info.status == "FINISHED" and resumed.data.params["train.lr"] == "0.0005"
    losses = {m.step for m in client.get_metric_history(resumed.info.run_id, "loss_fake_score")}
    assert {0, 39} <= losses
    fid_steps = {m.step for m in client.get_metric_history(resumed.info.run_id, "fid_student")}
    assert fid_steps >= {s for s in (10, 20, 30) if s > resumed_at} | {40}
