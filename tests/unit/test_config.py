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


def test_every_config_key_is_documented_in_the_reference():
    """docs/configuration.md is generated from the fields' docstrings (tests/unit/test_docs.py
    checks it is current): every key a run has must be there with a description."""
    from dmdscale.tools.config_reference import rows

    described = {r.key: r.description for r in rows()}
    reference = (ROOT / "docs" / "configuration.md").read_text()
    keys = [*build_config().flat(), "quick", *(f"sweep.{k}" for k in build_config().sweep.model_dump())]
    missing = [key for key in keys if not described.get(key) or f"`{key}`" not in reference]
    assert not missing, f"docs/configuration.md lacks a description of {missing}: give each field a docstring " \
                        f"in dmdscale/config.py and run `make docs`"


def test_the_family_checks_the_keys_that_depend_on_it():
    """The config checks types only; `families.resolve` names the family's own refusals, once,
    before any work (the command line calls it right after reading the config)."""
    from dmdscale.families import FAMILIES, resolve

    cfg = build_config({}, ["model.family=sd9"])  # a type-valid name
    with pytest.raises(ConfigError, match=r"config key 'model.family': unknown family 'sd9'; choose from "
                                          + ", ".join(FAMILIES)):
        resolve(cfg)
    with pytest.raises(ConfigError, match="lora.enabled: LoRA applies to the .*sd15.* not 'toy2d'"):
        resolve(build_config({}, ["lora.enabled=true"]))
    with pytest.raises(ConfigError, match="model.teacher: the toy2d teacher is the exact mixture denoiser"):
        resolve(build_config({}, ["model.teacher=some/where"]))
    assert resolve(load_config(TOY)) is FAMILIES["toy2d"]


def test_the_command_line_refuses_a_family_key_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "toy2d.py"), "--out", str(tmp_path / "r"),
                           "lora.enabled=true"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") <= 1, proc.stderr
    assert "lora.enabled: LoRA applies" in proc.stderr
