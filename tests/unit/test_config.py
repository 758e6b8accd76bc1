"""Config: YAML + --quick + dotted overrides; bad values name their key before any work."""
import subprocess
import sys
from pathlib import Path

import pytest

from dmdscale.config import ConfigError, build_config, load_config

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "pipelines" / "configs" / "toy2d.yaml"


@pytest.mark.parametrize("override, key", [
    ("train.ttur_ratio=0", "train.ttur_ratio"),
    ("train.foo=1", "train.foo"),
    ("generator.timesteps=[249,499]", "generator.timesteps"),
    ("generator.timesteps=[999,749,499,249,99]", "generator.timesteps"),
    ("scale.zero_stage=4", "scale.zero_stage"),
    ("loss.gan_critic_weight=-1", "loss.gan_critic_weight"),
    ("train.mixed_precision=fp16", "train.mixed_precision"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_config({}, [override])


def test_quick_then_overrides_apply_in_order():
    cfg = load_config(TOY, ["train.lr=0.002"], quick=True)
    assert cfg.train.max_steps == 3000  # from the YAML's quick section
    assert cfg.train.lr == 0.002 and cfg.model.family == "toy2d"
    assert load_config(TOY, ["train.max_steps=7"], quick=True).train.max_steps == 7
    assert load_config(TOY).train.max_steps == 6000


def test_contract_keys_exist_and_flatten():
    flat = build_config().flat()
    for key in ["model.teacher", "data.path", "data.resolution", "generator.timesteps", "train.max_steps",
                "train.batch_size", "train.ttur_ratio", "loss.guidance_scale", "loss.gan_generator_weight",
                "loss.gan_critic_weight", "loss.regression_weight", "scale.num_workers", "scale.use_gpu",
                "scale.zero_stage", "eval.num_samples"]:
        assert key in flat, key


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_pipeline_rejects_bad_value_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "toy2d.py"), "--out", str(tmp_path / "o"),
                           "train.ttur_ratio=0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "train.ttur_ratio" in proc.stderr
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_every_config_key_is_documented_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key in build_config().flat() if f"`{key}`" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"
