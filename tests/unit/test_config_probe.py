"""Issue 37, configs and the command line: values that passed validation and failed late (or
were ignored), the sweep metric, `no` as YAML reads it, overrides after options, --out."""
import json
from pathlib import Path

import numpy as np
import pytest

from dmdscale import cli
from dmdscale.config import ConfigError, build_config, load_config
from dmdscale.families import resolve

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "pipelines" / "configs" / "digits.yaml"


# -- values that failed on the workers or were ignored ---------------------------------------------
def test_adam_betas_outside_0_1_name_the_key():
    with pytest.raises(ConfigError, match=r"config key 'train.betas': .*each of Adam's betas must be in \[0, 1\)"):
        build_config({}, ["train.betas=[1.5,0.999]"])
    with pytest.raises(ConfigError, match="train.betas"):
        build_config({}, ["train.betas=[0.9,-0.1]"])
    assert build_config({}, ["train.betas=[0.0,0.99]"]).train.betas == (0.0, 0.99)


def test_the_regression_stage_is_refused_for_families_without_prompts():
    with pytest.raises(ConfigError, match=r"regression.enabled: the regression stage .* not 'unet2d'.*"
                                          r"loss.regression_weight"):
        resolve(load_config(DIGITS, ["regression.enabled=true"]))
    with pytest.raises(ConfigError, match="regression.enabled: .* not 'toy2d'"):
        resolve(build_config({}, ["regression.enabled=true"]))
    sdxl = build_config({}, {"model.family": "sdxl", "model.teacher": "someone/sdxl", "data.channels": 3,
                             "regression.enabled": True})
    assert resolve(sdxl).name == "sdxl" and sdxl.regression.enabled


def test_feature_depths_are_refused_where_no_transformer_reads_them():
    with pytest.raises(ConfigError, match="loss.gan_feature_depths: transformer teachers only; the unet2d"):
        resolve(load_config(DIGITS, ["loss.gan_feature_depths=[1]"]))
    with pytest.raises(ConfigError, match="loss.gan_feature_depths"):
        resolve(build_config({}, ["loss.gan_feature_depths=[2]"]))  # toy2d


def test_a_resolution_the_trained_teacher_cannot_take_fails_before_the_classifier(tmp_path):
    with pytest.raises(ConfigError, match=r"data.resolution: .* multiple of 4 \(got 18\)"):
        resolve(load_config(DIGITS, ["data.resolution=18", f"cache_dir={tmp_path}"], quick=True))
    cfg = load_config(DIGITS, ["data.resolution=20"], quick=True)
    assert resolve(cfg).name == "unet2d" and cfg.data.resolution == 20


def test_a_local_teachers_image_size_must_match_the_data(tmp_path):
    teacher = tmp_path / "teacher"
    for sub, name, content in (("unet", "config.json", {"sample_size": 16, "in_channels": 1}),
                               ("scheduler", "scheduler_config.json", {"num_train_timesteps": 1000})):
        (teacher / sub).mkdir(parents=True)
        (teacher / sub / name).write_text(json.dumps(content))
    cfg = load_config(DIGITS, [f"model.teacher={teacher}", "data.resolution=24", f"cache_dir={tmp_path}"], quick=True)
    with pytest.raises(ConfigError, match=r"data.resolution: the teacher .* takes 16x16 images, .* set "
                                          r"data.resolution=16"):
        resolve(cfg).preflight(cfg)
    cfg = load_config(DIGITS, [f"model.teacher={teacher}", "data.channels=3", f"cache_dir={tmp_path}"], quick=True)
    with pytest.raises(ConfigError, match="data.channels: the teacher .* takes 1-channel images"):
        resolve(cfg).preflight(cfg)
    assert not (tmp_path / "classifiers").exists()


# -- `no` as YAML reads it ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["no", "No", "false", "fp32", "'no'"])
def test_full_precision_is_accepted_however_yaml_reads_it(value, tmp_path):
    assert build_config({}, [f"train.mixed_precision={value}"]).train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  mixed_precision: {value}\n")
    assert load_config(path).train.mixed_precision == "no"
    assert build_config({}, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    with pytest.raises(ConfigError, match=r"train.mixed_precision': .*choose no \(or fp32\) .* or bf16"):
        build_config({}, ["train.mixed_precision=fp16"])


# -- the command line ---------------------------------------------------------------------------------
def test_overrides_may_follow_options(tmp_path):
    cfg, out = cli.parse(["--quick", f"cache_dir={tmp_path}", "--out", str(tmp_path / "o"), "train.lr=3e-4"],
                         DIGITS, "digits")
    assert cfg.train.lr == 3e-4 and cfg.cache_dir == str(tmp_path) and out == tmp_path / "o"


def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    for out, message in ((tmp_path / "f", "is a file, not a folder"), (tmp_path / "f" / "x", "cannot make the folder")):
        with pytest.raises(SystemExit) as exit_:
            cli.parse(["--out", str(out)], DIGITS, "digits")
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "error: --out: " in err and str(out) in err and message in err and "Traceback" not in err


# -- the sweep metric ---------------------------------------------------------------------------------
def test_a_sweep_metric_no_run_reports_is_refused_with_the_close_names():
    from dmdscale.sweep import check_sweep

    cfg = load_config(DIGITS, ["sweep.metric=fid_studnet"], quick=True)
    with pytest.raises(ConfigError, match=r"sweep.metric: 'fid_studnet' is not a figure unet2d runs report; "
                                          r"did you mean fid_student"):
        check_sweep(cfg)
    for metric in ("fid_student", "kid_student", "swd_pixels_student", "recall_pixels_student",
                   "class_accuracy_student", "train_images_per_s"):
        check_sweep(load_config(DIGITS, [f"sweep.metric={metric}"], quick=True))


def test_the_reported_names_follow_the_config():
    cfg = load_config(DIGITS, ["train.ema_decays=[0.9,0.97]", "export.ema=0.97", "generator.timesteps=[999,499]",
                               "export.choose=fixed"])
    names = resolve(cfg).metric_names(cfg)
    assert {"fid_student", "fid_student_raw", "fid_student_ema_0.9", "rollout_served"} <= names
    assert "fid_student_ema_0.97" not in names  # the exported one is `student`
    chosen = load_config(DIGITS, ["train.ema_decays=[0.9,0.97]", "export.ema=0.97", "export.choose=held_out"])
    assert "fid_student_ema_0.97" in resolve(chosen).metric_names(chosen)  # the raw weights may be exported
    cfg = load_config(DIGITS, ["train.ema_decays=[]", "export.ema=null", "train.ema_power=null", "export.choose=fixed"])
    names = resolve(cfg).metric_names(cfg)
    assert "fid_student_raw" not in names and "rollout_served" not in names
    sdxl = build_config({}, {"model.family": "sdxl", "model.teacher": "someone/sdxl", "data.channels": 3,
                             "data.resolution": 64})
    names = resolve(sdxl).metric_names(sdxl)
    assert {"clip_score_student", "fid_student", "swd64_pixels_student", "colorfulness_pixels_student"} <= names


def test_the_quality_names_are_those_sample_quality_reports():
    from dmdscale.eval.diversity import sample_quality
    from dmdscale.eval.metrics import sample_quality_names

    rng = np.random.default_rng(1)
    for resolution, channels in ((8, 1), (32, 3)):
        images = rng.integers(0, 256, (12, resolution, resolution, channels), dtype=np.uint8)
        assert set(sample_quality(images, images[::-1].copy())) == sample_quality_names(resolution, channels)
