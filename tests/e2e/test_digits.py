"""The digits pipeline end to end through the real stack: Ray Data, Ray Train + DeepSpeed,
clean-fid and MLflow (sqlite), on --quick, with corrupt rows in the training data."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import UNet2DModel

from dmdscale.data.sources import build_digits_parquet

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipelines" / "digits.py"


def _with_corrupt_rows(src: Path, dst: Path, n_bad: int) -> Path:
    table = pq.read_table(src)
    bad = pa.table({"image": [b"not a png"] * n_bad, "label": pa.array([3] * n_bad, pa.int64()),
                    "prompt": ["a handwritten digit 3"] * n_bad})
    pq.write_table(pa.concat_tables([table, bad.cast(table.schema)]), dst)
    return dst


def test_bad_config_value_stops_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(PIPELINE), "--quick", "--out", str(tmp_path / "o"),
                           "scale.zero_stage=5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "scale.zero_stage" in proc.stderr
    assert not (tmp_path / "o" / "metrics.json").exists()


def _bad_input(tmp_path: Path, case: str) -> tuple[list[str], dict[str, str], str]:
    """(arguments, environment, the one message expected) of a bad input."""
    if case == "no labels":
        pq.write_table(pa.table({"image": [b"x"]}), tmp_path / "nolabels.parquet")
        return [f"data.path={tmp_path / 'nolabels.parquet'}"], {}, "required column 'label' is missing"
    if case == "labels beyond the classes":
        pq.write_table(pa.table({"image": [b"x"] * 3, "label": pa.array([0, 1, 12], pa.int64())}), tmp_path / "l.parquet")
        return [f"data.path={tmp_path / 'l.parquet'}"], {}, "1 of 3 rows have labels outside [0, 10) (found 0..12)"
    if case == "YAML syntax":
        (tmp_path / "bad.yaml").write_text("model:\n  family: unet2d\n train: {\n")
        return ["--config", str(tmp_path / "bad.yaml")], {}, "not valid YAML"
    if case == "teacher folder":
        return [f"model.teacher={tmp_path / 'teacher'}"], {}, "is not a diffusers UNet teacher: missing unet/, scheduler/"
    if case == "fail-at-step":
        return [], {"DMDSCALE_FAIL_AT_STEP": "soon"}, "DMDSCALE_FAIL_AT_STEP must be a non-negative integer step"
    if case == "storage path":  # an unreachable bucket, credentials in the URI
        return ["scale.storage_path=s3://AKIA:secretpw@no-such-bucket.invalid/x"], {"AWS_EC2_METADATA_DISABLED": "true"}, \
            "scale.storage_path: cannot use s3://AKIA:***@no-such-bucket.invalid/x for checkpoints"
    assert case == "tracking server"
    return [], {"MLFLOW_TRACKING_URI": "http://bob:pw@127.0.0.1:9"}, "the MLflow tracking server at http://bob:***@"


@pytest.mark.parametrize("case", ["no labels", "labels beyond the classes", "YAML syntax", "teacher folder",
                                  "fail-at-step", "tracking server", "storage path"])
def test_bad_input_is_one_line_before_any_work(tmp_path, case):
    """Each is found by a cheap check, before the classifier or teacher trains or Ray starts,
    and is one line naming its cause, without a traceback (issue 17)."""
    args, env, message = _bad_input(tmp_path, case)
    proc = subprocess.run([sys.executable, str(PIPELINE), "--quick", "--out", str(tmp_path / "o"),
                           f"cache_dir={tmp_path / 'cache'}", *args], capture_output=True, text=True, timeout=300,
                          env=os.environ | env, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "pw@" not in proc.stderr
    assert not (tmp_path / "o" / "ray").exists() and not (tmp_path / "cache" / "classifiers").exists()


@pytest.fixture(scope="module")
def cache(digits_cache):
    return digits_cache


@pytest.mark.slow
def test_quick_digits_run_end_to_end_through_an_injected_failure(tmp_path, mlflow_uri, cache):
    """Corrupt rows, rank 0 failing once at step 12 (quick checkpoints every 5 steps), and
    checkpoints evaluated on actors while training goes on."""
    splits = build_digits_parquet(cache / "digits")
    train = _with_corrupt_rows(splits["train"], tmp_path / "train_with_corrupt.parquet", n_bad=7)
    out = tmp_path / "run"
    subprocess.run([sys.executable, str(PIPELINE), "--quick", "--out", str(out), f"cache_dir={cache}",
                    f"data.path={train}", f"data.eval_path={splits['test']}"],
                   check=True, timeout=1500, cwd=tmp_path, env=os.environ | {"DMDSCALE_FAIL_AT_STEP": "12"})

    m = json.loads((out / "metrics.json").read_text())
    for key in ["fid_teacher", "teacher_steps", "fid_student", "student_steps", "class_accuracy_student",
                "class_accuracy_teacher", "sampling_speedup", "train_images_per_s", "data_wait_fraction",
                "skipped_rows"]:
        assert key in m, key
    assert m["skipped_rows"] == 7  # the corrupt rows were skipped and counted, not fatal
    assert m["steps_completed"] == 20 and m["student_steps"] == 1
    # The failure at step 12 was recovered from the checkpoint after step 9, not from step 0.
    assert m["restarts"] == 1 and m["resumed_from_step"] == 10
    assert m["sampling_speedup"] > 1 and 0 <= m["data_wait_fraction"] < 1
    # Where the start-up went: each phase's end, seconds since the command started, in order
    # (the worker's from its last start, after the injected failure).
    from dmdscale.startup import PHASES

    ends = [m[f"startup_{phase}_s"] for phase in PHASES]
    assert 0 < ends[0] and all(a <= b for a, b in zip(ends, ends[1:])), dict(zip(PHASES, ends))
    assert m["classifier_accuracy_held_out"] > 0.9
    assert np.isfinite([m["fid_teacher"], m["fid_student"]]).all()
    # The teacher's evaluation samples are kept for the next run with this teacher (issue 36).
    keys = [json.loads(p.read_text()) for p in (cache / "teacher_samples").glob("*.json")]
    assert any(k["teacher_steps"] == m["teacher_steps"] and k["teacher"] for k in keys), keys
    # So are the figures measured on them (with the real floor's) and the regression loss's ODE pairs.
    figures = [json.loads(p.read_text())["figures"] for p in (cache / "teacher_figures").glob("*.json")]
    assert any(f["fid_teacher"] == m["fid_teacher"] and f["fid_real_train"] == m["fid_real_train"] for f in figures)
    pairs = [json.loads(p.read_text()) for p in (cache / "regression_pairs").glob("*.json")]
    assert any(k["pairs"] == 64 and k["steps"] == 10 and k["teacher"] for k in pairs), pairs

    arrays = np.load(out / "samples.npz")
    assert arrays["images"].dtype == np.uint8 and arrays["images"].shape[1:] == (16, 16, 1)
    assert arrays["labels"].shape == (len(arrays["images"]),)
    assert set(arrays["labels"].tolist()) == set(range(10))
    assert (out / "samples.png").stat().st_size > 5_000

    # The exported student loads with diffusers and generates.
    unet = UNet2DModel.from_pretrained(out / "student", subfolder="unet")
    with torch.no_grad():
        x = unet(torch.randn(2, 1, 16, 16), torch.tensor([999, 999]), class_labels=torch.tensor([1, 2])).sample
    assert x.shape == (2, 1, 16, 16) and torch.isfinite(x).all()
    assert json.loads((out / "student" / "dmdscale.json").read_text())["timesteps"] == [999]
    # Its model card: Hub front matter, the stock-diffusers loop, the run's figures.
    card = (out / "student" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers") and "scheduler.set_timesteps(num_inference_steps=1)" in card
    assert f"| `fid_student` | {m['fid_student']:.4g} |" in card and "UNet2DModel.from_pretrained" in card

    run = mlflow.search_runs(experiment_names=["digits"], output_format="list")[0]
    assert run.info.status == "FINISHED" and run.data.params["train.ttur_ratio"] == "5"
    client = mlflow.MlflowClient()
    assert len(client.get_metric_history(run.info.run_id, "loss_fake_score")) >= 3  # logged per step by rank 0
    # Checkpoints after 5, 10 (before the failure) and 15 iterations were evaluated by the
    # actors while training went on, then the final student at 20.
    fid_steps = sorted(x.step for x in client.get_metric_history(run.info.run_id, "fid_student"))
    assert fid_steps == [5, 10, 15, 20] and m["checkpoint_evaluations"] == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "samples.png", "losses.png", "fid.png", "eval_grids"} <= artifacts
    assert len(client.list_artifacts(run.info.run_id, "eval_grids")) == 3
    assert (out / "losses.png").stat().st_size > 5_000
    # losses.png's data in the run folder: rank 0's log, carried through the failure's resume
    # (logged every 5 steps and at the checkpoints after 5, 10, 15 iterations), each step once.
    log = json.loads((out / "train_log.json").read_text())
    assert [r["step"] for r in log] == [0, 4, 5, 9, 10, 14, 15, 19] and all("loss_fake_score" in r for r in log)
    assert [e["step"] for e in json.loads((out / "checkpoint_evaluations.json").read_text())] == [5, 10, 15]
    assert m["fid_real_train"] < m["fid_teacher_1step"]  # the floor sits below a 1-step teacher's blur
    # Every figure the run reports is one a sweep may name (sweep.metric is checked against these).
    from dmdscale.config import load_config
    from dmdscale.families import resolve

    cfg = load_config(ROOT / "pipelines" / "configs" / "digits.yaml", quick=True)
    numbers = {k for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numbers <= resolve(cfg).metric_names(cfg), numbers - resolve(cfg).metric_names(cfg)

    # The exported student is whichever of digits.yaml's generator EMA and the raw weights scored the
    # lower held-out FID (export.choose); the other is evaluated beside it, at the end and at every
    # checkpoint, with KID next to FID.
    ema, fids = "ema_0.97", m["export_choice_fid"]
    assert set(fids) == {ema, "raw"} and m["student_weights"] == min(fids, key=fids.get)
    other = "raw" if m["student_weights"] == ema else ema
    assert (out / "alternates" / other / "student" / "unet").is_dir()
    assert not (out / "alternates" / m["student_weights"]).exists()
    assert np.isfinite([m[f"fid_student_{other}"], m["kid_student"], m["kid_teacher"], m["kid_real_train"]]).all()
    evaluations = json.loads((out / "checkpoint_evaluations.json").read_text())
    assert all(np.isfinite([e["fid_student"], e[f"fid_student_{ema}"], e["kid_student"]]).all() for e in evaluations)
    # The diagnostics (by noise level, and the two terms' gradient norms) and what a next stage starts from.
    assert (out / "diagnostics.png").stat().st_size > 10_000 and "diagnostics.png" in artifacts
    assert any(k.startswith("diag_d_real_sigma_") for r in log for k in r)
    assert {"grad_norm_dm_x", "grad_norm_gan_x"} <= {k for r in log for k in r}
    assert {p.name for p in (out / "stage").iterdir()} == {"generator.safetensors", "critic.safetensors",
                                                           "ema.safetensors"}


def _interrupt_when(proc: subprocess.Popen, path: Path, timeout: float = 1200) -> None:
    """Ctrl-C `proc` as soon as `path` exists."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)


@pytest.mark.slow
def test_a_second_stage_starts_from_the_first_runs_weights(tmp_path, cache):
    """train.init: stage 2 loads stage 1's generator, critic and EMA (here: the quick run's own
    stage written by a first quick run), with new settings, through the real command. Stage 1 is
    interrupted in its final evaluation: the same command then only evaluates, keeping the training."""
    from safetensors.torch import load_file

    first = tmp_path / "stage1"
    # The teacher's 1000-step sampler keeps the final evaluation going for seconds, so the
    # interrupt lands in it (at the quick run's 10 steps it could end before the signal did).
    # Two generator updates (TTUR 1), so that the EMA differs from the raw weights.
    command = [sys.executable, str(PIPELINE), "--quick", "--out", str(first), f"cache_dir={cache}", "train.max_steps=2",
               "train.ttur_ratio=1", "eval.during_training=false", "eval.num_samples=20", "eval.teacher_steps=1000"]
    with open(tmp_path / "stderr.txt", "w") as stderr:  # a file: a full pipe would stall the run
        # SIGINT at its default, as a terminal's Ctrl-C finds it: a disposition ignored in this
        # process (by anything earlier in the session) would be inherited and the signal lost.
        proc = subprocess.Popen(command, cwd=tmp_path, stderr=stderr, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        _interrupt_when(proc, first / "trained.json")  # training is done, the evaluation under way
        proc.wait(timeout=300)
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130 and "interrupted" in err and not (first / "metrics.json").exists(), err[-3000:]
    trained_log = (first / "train_log.json").read_text()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "whose training finished; evaluating it" in proc.stdout and "resumed from the checkpoint" not in proc.stdout
    assert (first / "train_log.json").read_text() == trained_log  # not trained again
    assert json.loads((first / "metrics.json").read_text())["steps_completed"] == 2
    second = tmp_path / "stage2"
    proc = subprocess.run([sys.executable, str(PIPELINE), "--quick", "--out", str(second), f"cache_dir={cache}",
                           "train.max_steps=1", "train.lr=1e-12", "train.critic_lr=1e-12", f"train.init={first}",
                           "train.init_ema=0.97", "eval.during_training=false", "eval.num_samples=20"],
                          capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One iteration at lr 1e-12 leaves stage 1's weights where they were: stage 2 started from
    # them, the generator from stage 1's EMA (train.init_ema), not from its raw weights.
    a, b = load_file(first / "stage" / "critic.safetensors"), load_file(second / "stage" / "critic.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a), "critic"
    raw, ema = load_file(first / "stage" / "generator.safetensors"), load_file(first / "stage" / "ema.safetensors")
    average = {k.split("/", 1)[1]: v for k, v in ema.items() if k.startswith("ema_0.97/")}
    started = load_file(second / "stage" / "generator.safetensors")
    assert average and all(torch.allclose(started[k].float(), v.float(), atol=1e-6) for k, v in average.items())
    assert any(not torch.allclose(raw[k].float(), v.float(), atol=1e-6) for k, v in average.items())
    assert json.loads((second / "metrics.json").read_text())["steps_completed"] == 1
    # A start folder that is not a run stops before any work, naming the key.
    proc = subprocess.run([sys.executable, str(PIPELINE), "--quick", "--out", str(tmp_path / "bad"),
                           f"cache_dir={cache}", f"train.init={tmp_path}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "train.init" in proc.stderr and not (tmp_path / "bad" / "ray").exists()


def test_a_changed_config_does_not_resume_someone_elses_run(tmp_path, cache):
    from dmdscale.config import load_config
    from dmdscale.distributed.checkpoint.journal import RunJournal

    out = tmp_path / "run"
    cfg = load_config(ROOT / "pipelines" / "configs" / "digits.yaml", [f"cache_dir={cache}"], quick=True)
    RunJournal.at(str(out / "ray"), "digits-run").begin(cfg.flat())  # an unfinished run
    (out / "ray" / "digits-run" / "checkpoint_2026-11-30_00-00-00.000000").mkdir()  # that took steps
    proc = subprocess.run([sys.executable, str(PIPELINE), "--quick", "--out", str(out), f"cache_dir={cache}",
                           "train.lr=0.1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0 and "train.lr" in proc.stderr
