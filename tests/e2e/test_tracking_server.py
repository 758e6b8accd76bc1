"""Logging to a real `mlflow server` (sqlite backend, proxied artifacts, 127.0.0.1), and a
server that goes away mid-run: training goes on with one warning, the run folder is whole.

The pipeline runs are toy2d (a pure process, seconds of training); each server test starts its
own server (about 10 s on 2 cores).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port
from mlflow import MlflowClient

from dmdscale.tracking import HTTP_CLIENT_DEFAULTS, MlflowSink, Tracker, TrackingUnavailable, bound_http_retries

ROOT = Path(__file__).resolve().parents[2]
TOY = [sys.executable, str(ROOT / "pipelines" / "toy2d.py"), "--quick"]
# A small toy run: training is what matters here, not the distillation's quality.
SMALL = ["toy2d.init_steps=50", "eval.num_samples=500", "eval.teacher_steps=5", "train.log_every=20"]
WARNING = "warning: MLflow logging to"


@pytest.fixture
def http_client_env(monkeypatch):
    """The bounded HTTP retry settings that dmdscale sets in its own process are undone after
    the test (set then deleted through monkeypatch, which restores each one's absence)."""
    for name in HTTP_CLIENT_DEFAULTS:
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)


def toy_env(uri: str) -> dict[str, str]:
    # One torch thread: the machine's two cores are shared with the server (and other work).
    return os.environ | {"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}



# Logging a whole Ray run (driver, rank 0, evaluation actors, artifacts) to a server is checked
# by the sweep test in tests/test_sweep.py.


@pytest.mark.slow
def test_training_goes_on_when_the_server_goes_away(mlflow_server, tmp_path):
    out = tmp_path / "toy"
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([*TOY, "--out", str(out), *SMALL, "train.max_steps=500"], env=toy_env(mlflow_server.uri),
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            client = MlflowClient(mlflow_server.uri)
            deadline = time.monotonic() + 120
            while not _logged_a_loss(client):  # training has started and reached the server
                assert proc.poll() is None, stderr_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "no loss reached the server"
                time.sleep(0.2)
            mlflow_server.kill()
            assert proc.poll() is None, "the run ended before the server went away: raise train.max_steps"
            returncode = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = stderr_path.read_text()
    assert returncode == 0, err[-3000:]
    # One warning for the outage (not one per step), naming the server, then the summary.
    assert err.count(WARNING) == 1, err[-3000:]
    assert mlflow_server.uri in err and "Training goes on" in err and "run folder" in err
    assert "were skipped in this process" in err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps_completed"] == 500
    for name in ("samples.png", "losses.png", "samples.npz"):
        assert (out / name).stat().st_size > 1000, name


def _logged_a_loss(client: MlflowClient) -> bool:
    experiment = client.get_experiment_by_name("toy2d")
    if experiment is None:
        return False
    return any("loss_dm" in run.data.metrics for run in client.search_runs([experiment.experiment_id]))


def test_an_unreachable_server_at_the_start_is_an_error(monkeypatch, http_client_env):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t0 = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="MLFLOW_TRACKING_URI") as error:
        Tracker("nowhere")
    assert uri in str(error.value)
    assert time.monotonic() - t0 < 30  # the client's bounded retries, not MLflow's 4 minutes


def test_bounded_retries_are_defaults_a_user_setting_wins(monkeypatch, http_client_env):
    bound_http_retries("sqlite:///mlflow.db")  # no HTTP: nothing set
    assert not any(name in os.environ for name in HTTP_CLIENT_DEFAULTS)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    bound_http_retries("https://mlflow.example.org")
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "300"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == HTTP_CLIENT_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]


class FlakyServer:
    """A stand-in for the MLflow call: fails while `down`, counts the calls that reached it."""

    def __init__(self):
        self.down, self.calls = True, 0

    def __call__(self, client: object) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("connection refused")


def test_sink_warns_once_backs_off_and_says_when_the_server_is_back(capsys):
    now = [0.0]
    sink = MlflowSink("file:///srv/mlruns", "run-1", client=object(), retry_after=60, clock=lambda: now[0])
    server = FlakyServer()

    assert not sink.call("metrics at step 0", server)
    warning = capsys.readouterr().err
    assert warning.count(WARNING) == 1 and "file:///srv/mlruns" in warning and "connection refused" in warning
    assert "Training goes on" in warning and "run folder" in warning

    for t in range(1, 60):  # within the window: skipped, never sent, silent
        now[0] = t
        assert not sink.call("metrics", server)
    assert server.calls == 1 and sink.skipped == 59 and sink.last_problem.startswith("skipped")
    now[0] = 61  # tried again, still down: silent, and the next wait is twice as long
    assert not sink.call("metrics", server)
    assert server.calls == 2 and sink.failures == 2 and capsys.readouterr().err == ""
    now[0] = 61 + 119
    assert not sink.call("metrics", server) and server.calls == 2

    server.down = False
    now[0] = 61 + 121
    assert sink.call("metrics", server) and server.calls == 3
    assert "answers again" in capsys.readouterr().err
    assert sink.call("metrics", server) and server.calls == 4 and not sink.failing  # no window any more
    assert capsys.readouterr().err == ""

    server.down = True  # a second outage is reported again, with the first wait
    now[0] = 1000
    assert not sink.call("metrics", server) and capsys.readouterr().err.count(WARNING) == 1
    now[0] = 1061
    assert sink.call("metrics", server) is False and server.calls == 6


def test_a_sink_without_a_run_does_nothing():
    server = FlakyServer()
    sink = MlflowSink(None, None)
    assert sink.call("metrics", server) and sink.log_metrics({"loss": 1.0}, 0)
    assert server.calls == 0 and sink.failures == sink.skipped == 0


def test_rank0_log_survives_a_checkpoint_and_draws_the_curves(tmp_path):
    """Nothing lost locally: the logged reports travel in rank 0's training state (so a resumed
    run's train_log.json is whole) and the loss curves come from them, not from MLflow."""
    from dmdscale.distributed.checkpoint.state import TrainingState, load_training_state, save_training_state
    from dmdscale.eval.plots import curves_from_log

    logged = [{"step": 0, "loss_dm": 1.0, "loss_fake_score": 0.5},
              {"step": 10, "loss_fake_score": 0.25},  # a critic-only step has no loss_dm
              {"step": 5, "loss_dm": 0.5, "loss_fake_score": 0.4, "epoch": 0}]
    rngs = {"torch": torch.get_rng_state(), "step": torch.Generator().get_state()}
    save_training_state(tmp_path, TrainingState(11, 0, 3, logged), {}, rngs, rank=0)
    state, _ = load_training_state(tmp_path, {}, rank=0)
    assert state.logged == logged

    curves = curves_from_log(state.logged, "loss_")
    assert curves == {"loss_dm": ([0, 5], [1.0, 0.5]), "loss_fake_score": ([0, 5, 10], [0.5, 0.4, 0.25])}
    evaluations = [{"step": 10, "fid_student": 30.0}, {"step": 5, "fid_student": None, "error": "x"}]
    assert curves_from_log(evaluations, "fid_student") == {"fid_student": ([10], [30.0])}
