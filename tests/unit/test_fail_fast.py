"""Fail fast, fail clearly (issue 17): every expected error is one line naming its cause, found
by a cheap check before anything slow; unexpected errors keep their tracebacks."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dmdscale import cli
from dmdscale.config import ConfigError, build_config, load_config
from dmdscale.data.sources import DataError, build_imagefolder, check_source
from dmdscale.errors import TeacherNotFound, UserError, user_error_in
from dmdscale.families import resolve

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "pipelines" / "configs" / "digits.yaml"


def _labelled_parquet(path: Path, labels: list[int]) -> Path:
    pq.write_table(pa.table({"image": [b"x"] * len(labels), "label": pa.array(labels, pa.int64())}), path)
    return path


# -- labels and class counts ------------------------------------------------------------------
def test_labels_outside_the_classes_are_named_at_preflight(tmp_path):
    path = _labelled_parquet(tmp_path / "d.parquet", [0, 3, 10, 11, 2])
    assert check_source(path, require_labels=True, num_classes=12) == "parquet"
    with pytest.raises(DataError) as err:
        check_source(path, require_labels=True, num_classes=10)
    assert str(err.value) == (f"{path}: 2 of 5 rows have labels outside [0, 10) (found 0..11); set data.num_classes "
                              f"to at least 12 or fix the labels")
    folder = build_imagefolder(tmp_path / "f", [np.zeros((8, 8), np.uint8)] * 2, ["a", "b"], labels=[-1, 1])
    with pytest.raises(DataError, match=r"metadata.jsonl: 1 of 2 rows have labels outside \[0, 10\) \(found -1..1\)"):
        check_source(folder, require_labels=True, num_classes=10)


def test_the_fid_classifier_and_evaluation_take_any_class_count(tmp_path):
    """12 classes: the classifier (built with 10 before) trains, classifies and is cached."""
    from dmdscale.eval.metrics import class_accuracy, load_or_train_classifier

    rng = np.random.default_rng(0)
    labels = np.arange(96) % 12
    images = (rng.random((96, 16, 16, 1)) * 255).astype(np.uint8)
    images[np.arange(96), labels, :, 0] = 255  # a bright row per class: learnable
    clf = load_or_train_classifier(tmp_path, images, labels, steps=60, progress=False, num_classes=12)
    assert clf.num_classes == 12 and class_accuracy(clf, images, labels) > 0.5
    again = load_or_train_classifier(tmp_path, images, labels, steps=60, progress=False, num_classes=12)
    assert again.num_classes == 12 and len(list(tmp_path.glob("*.safetensors"))) == 1


def test_unet2d_preflight_checks_labels_against_the_class_count(tmp_path):
    from dmdscale.families import resolve

    data = _labelled_parquet(tmp_path / "d.parquet", [0, 1, 99])
    cfg = load_config(DIGITS, [f"data.path={data}", "data.num_classes=100", f"cache_dir={tmp_path}"], quick=True)
    assert resolve(cfg).preflight(cfg).train_path == str(data)
    cfg = load_config(DIGITS, [f"data.path={data}", f"cache_dir={tmp_path}"], quick=True)
    with pytest.raises(DataError, match="set data.num_classes to at least 100"):
        resolve(cfg).preflight(cfg)


# -- evaluation settings, teacher, tracking server: before anything slow ------------------------
def test_evaluation_settings_fail_at_preflight_not_after_training(tmp_path):
    from dmdscale.families import resolve

    with pytest.raises(ConfigError, match="eval.num_samples"):
        build_config({}, ["eval.num_samples=1"])
    cfg = load_config(DIGITS, ["eval.teacher_steps=1001", f"cache_dir={tmp_path}"], quick=True)
    with pytest.raises(ConfigError, match="eval.teacher_steps: 1001 sampler steps, but the teacher's schedule has 1000"):
        resolve(cfg).preflight(cfg)
    teacher = tmp_path / "teacher"
    for sub, name, content in (("unet", "config.json", {}), ("scheduler", "scheduler_config.json",
                                                            {"num_train_timesteps": 100})):
        (teacher / sub).mkdir(parents=True)
        (teacher / sub / name).write_text(json.dumps(content))
    cfg = load_config(DIGITS, [f"model.teacher={teacher}", "eval.teacher_steps=101", f"cache_dir={tmp_path}"],
                      quick=True)
    with pytest.raises(ConfigError, match="has 100 timesteps; use at most 100"):
        resolve(cfg).preflight(cfg)


def test_a_wrong_teacher_fails_at_preflight_before_the_classifier_trains(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from dmdscale.families import resolve

    cfg = load_config(DIGITS, [f"model.teacher={tmp_path / 'nowhere'}", f"cache_dir={tmp_path}"], quick=True)
    with pytest.raises(TeacherNotFound, match="nowhere.*missing unet/, scheduler/"):
        resolve(cfg).preflight(cfg)
    assert not (tmp_path / "classifiers").exists()  # nothing slow ran
    # A hub id on an offline machine without it in the cache: at once, not inside a Ray Data actor.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = load_config(DIGITS, ["model.teacher=someone/no-such-teacher", f"cache_dir={tmp_path}"], quick=True)
    started = time.monotonic()
    with pytest.raises(TeacherNotFound, match="not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        resolve(cfg).preflight(cfg)
    assert time.monotonic() - started < 5


def test_an_unreachable_tracking_server_is_one_clear_error_without_its_credentials():
    from dmdscale.tracking import TrackingUnavailable, check_tracking_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(TrackingUnavailable) as err:
        check_tracking_server(f"http://alice:s3cret@127.0.0.1:{port}", timeout=2)
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "s3cret" not in message and "MLFLOW_TRACKING_URI" in message
    check_tracking_server("sqlite:///mlflow.db")  # a local store needs no server


# -- config files and overrides -----------------------------------------------------------------
def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1e-4\n  max_steps: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"config file '{bad}' line \d+, column \d+: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="override 'train.lr=\\[1': the value is not valid YAML"):
        load_config(None, ["train.lr=[1"])


def test_fail_at_step_is_a_config_error():
    from dmdscale.distributed.checkpoint.faults import parse_fail_at_step

    with pytest.raises(ConfigError, match="DMDSCALE_FAIL_AT_STEP must be a non-negative integer step, got 'x'"):
        parse_fail_at_step("x")


# -- batch size, workers and the cluster's size ---------------------------------------------------
def test_batch_and_workers_are_checked_against_each_other():
    with pytest.raises(ConfigError, match="train.batch_size: 10 does not split evenly over scale.num_workers=4"):
        build_config({}, ["train.batch_size=10", "scale.num_workers=4"])
    with pytest.raises(ConfigError, match="train.batch_size: 2 does not split evenly over scale.num_workers=4"):
        build_config({}, ["train.batch_size=2", "scale.num_workers=4"])  # a micro-batch of 0
    from dmdscale.distributed.resources import worker_resources

    cfg = build_config({}, ["train.batch_size=64", "scale.num_workers=64", "eval.during_training=false"])
    with pytest.raises(ConfigError, match=r"scale.num_workers=64 .* leaves each train worker 0.0156 .* "
                                          r"use scale.num_workers <= 4"):
        worker_resources(cfg, resolve(cfg), 2.0)


def _sdxl(tmp_path, *overrides):
    return build_config({}, {"model.family": "sdxl", "model.teacher": "someone/sdxl", "data.channels": 3,
                             "data.encode_actors": 8, "scale.use_gpu": True, "eval.during_training": False,
                             **dict(o.split("=", 1) for o in overrides)})


def test_a_request_the_cluster_can_never_hold_is_an_immediate_error(tmp_path):
    from dmdscale.distributed.cluster import ensure_fits

    cfg = _sdxl(tmp_path)
    slept = []
    with pytest.raises(ConfigError) as err:
        ensure_fits(cfg, resolve(cfg), cluster=lambda: {"CPU": 2.0}, autoscales=False, sleep=slept.append)
    assert str(err.value) == ("latent encoding needs 8 CPU, 8 GPU but the Ray cluster has 2 CPU, 0 GPU (short of "
                              "6 CPU, 8 GPU); change data.encode_actors, scale.use_gpu, scale.data_cpus, or run on a "
                              "larger cluster")
    assert slept == []  # no waiting without an autoscaler
    ensure_fits(cfg, resolve(cfg), cluster=lambda: {"CPU": 16.0, "GPU": 8.0}, autoscales=False)  # fits


def test_an_autoscaling_cluster_is_waited_for_with_a_bound(tmp_path, capsys):
    from dmdscale.distributed.cluster import ensure_fits

    sizes = iter([{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 16.0, "GPU": 8.0}])
    size = {"CPU": 2.0}

    def cluster():
        return size

    def grow(_):
        nonlocal size
        size = next(sizes)

    ensure_fits(_sdxl(tmp_path), resolve(_sdxl(tmp_path)), cluster=cluster, autoscales=True, sleep=grow)
    assert "Asking the autoscaler and waiting up to scale.resource_wait_s=600 s" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="after waiting 0 s"):
        ensure_fits(_sdxl(tmp_path, "scale.resource_wait_s=0"), resolve(_sdxl(tmp_path, "scale.resource_wait_s=0")), cluster=lambda: {"CPU": 2.0}, autoscales=True)


# -- the Ray cluster a run joins -------------------------------------------------------------------
@pytest.mark.slow
def test_a_dead_recorded_ray_cluster_is_not_joined(tmp_path):
    """A killed local run leaves its address in Ray's temp dir; the next run starts afresh
    within seconds instead of retrying the dead address for minutes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    tmp = Path("/tmp") / f"dmdscale-ray-{os.getpid()}"  # short: Ray's socket paths must fit 107 bytes
    (tmp / "ray").mkdir(parents=True, exist_ok=True)
    (tmp / "ray" / "ray_current_cluster").write_text(dead)  # where Ray records it under RAY_TMPDIR
    code = ("from dmdscale.distributed.cluster import connect; import ray; connect(num_cpus=1, include_dashboard=False); "
            "print('cpus', ray.cluster_resources()['CPU']); ray.shutdown()")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(tmp)}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cpus 1.0" in proc.stdout and f"({dead}) is not running" in proc.stderr
    assert time.monotonic() - started < 60
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=env | {"RAY_ADDRESS": dead})
    shutil.rmtree(tmp, ignore_errors=True)
    assert bad.returncode != 0 and f"RAY_ADDRESS={dead}: no Ray cluster answers there" in bad.stderr


# -- the command line ------------------------------------------------------------------------------
def _main(run, *argv):
    return cli.main(run, [str(a) for a in argv], DIGITS, "test", family="unet2d")


def test_expected_errors_are_one_line_and_unexpected_ones_keep_their_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def data_error(cfg, out):
        raise DataError(f"{tmp_path}/x.parquet: required column 'label' is missing")

    with pytest.raises(SystemExit) as code:
        _main(data_error, "--out", tmp_path / "o")
    err = capsys.readouterr().err
    assert code.value.code == 2 and "Traceback" not in err
    assert err.splitlines()[0].endswith(f"error: {tmp_path}/x.parquet: required column 'label' is missing")

    class WorkerGroupError(Exception):  # what ray.train raises, holding the workers' errors by rank
        def __init__(self, failures):
            super().__init__("training failed")
            self.worker_failures = failures

    def wrapped(cfg, out):
        raise WorkerGroupError({0: TeacherNotFound("model.teacher 'x' is missing unet/")})

    with pytest.raises(SystemExit):
        _main(wrapped, "--out", tmp_path / "o")
    assert "error: model.teacher 'x' is missing unet/" in capsys.readouterr().err
    with pytest.raises(DataError):  # --debug: the traceback
        _main(data_error, "--out", tmp_path / "o", "--debug")

    def bug(cfg, out):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        _main(bug, "--out", tmp_path / "o")


def test_user_errors_are_found_behind_causes():
    inner = ConfigError("train.lr: bad")
    try:
        try:
            raise inner
        except ConfigError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as outer:
        assert user_error_in(outer) is inner
    assert user_error_in(RuntimeError("x")) is None and isinstance(inner, UserError)
