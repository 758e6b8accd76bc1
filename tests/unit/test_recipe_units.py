"""The recipe stages' pieces without a cluster: prompt-only sources and what refuses them, the
regression stage's config checks and its LPIPS distance on decoded latents."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dmdscale.config import ConfigError
from dmdscale.data.sources import DataError, check_source, count_prompts, is_prompt_only, load_arrays, load_prompts
from dmdscale.families import resolve
from tests.conftest import text_cfg


@pytest.fixture
def prompt_sources(tmp_path):
    txt = tmp_path / "prompts.txt"
    txt.write_text("a cat\n\n  a dog  \na bird\n")
    parquet = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["a cat", "a dog"]}), parquet)
    return str(txt), str(parquet)


def test_prompt_only_sources_are_read_and_refused_where_images_are_needed(prompt_sources, tmp_path):
    txt, parquet = prompt_sources
    assert is_prompt_only(txt) and is_prompt_only(parquet)
    assert load_prompts(txt) == ["a cat", "a dog", "a bird"] and load_prompts(parquet, 1) == ["a cat"]
    assert count_prompts(txt) == 3 and count_prompts(parquet) == 2
    assert check_source(txt, require_labels=False, require_prompts=True, allow_prompt_only=True) == "prompts"
    for path in (txt, parquet):
        with pytest.raises(DataError, match="image"):
            load_arrays(path, 16, 3)
        with pytest.raises(DataError, match="image"):
            check_source(path, require_labels=False, require_prompts=True)
    pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "neither.parquet")
    with pytest.raises(DataError, match="image"):
        check_source(tmp_path / "neither.parquet", require_labels=False, allow_prompt_only=True)


def test_prompt_only_data_is_refused_where_a_real_image_would_be_read(tiny, prompt_sources):
    """Before any cluster work: the GAN terms and the noised-real-data ablation name data.path
    and the keys; a no-GAN stage and the regression stage pass."""
    txt, parquet = prompt_sources
    base = {"data.path": txt, "eval.teacher_steps": 4}
    for gan in ({"loss.gan_generator_weight": 1e-3}, {"loss.gan_critic_weight": 1e-2}, {"loss.gan_grad_ratio": 0.1}):
        cfg = text_cfg("sd15", tiny["sd15"], **base, **gan)
        with pytest.raises(ConfigError, match=r"data.path: .*prompts.txt holds prompts only.*loss.gan_generator_weight"):
            resolve(cfg).preflight(cfg)
    cfg = text_cfg("sd15", tiny["sd15"], **base, **{"generator.timesteps": [999, 499],
                                                    "generator.backward_simulation": False})
    with pytest.raises(ConfigError, match="generator.backward_simulation"):
        resolve(cfg).preflight(cfg)
    for extra in ({}, {"regression.enabled": True, "loss.gan_critic_weight": 1e-2}):
        cfg = text_cfg("sdxl", tiny["sdxl"], **{**base, "data.path": parquet}, **extra)
        assert resolve(cfg).preflight(cfg).prompts == ["a cat", "a dog"]


def test_regression_config_checks(tiny):
    with pytest.raises(ConfigError, match="regression.lpips_weights"):
        text_cfg("sdxl", tiny["sdxl"], **{"regression.metric": "lpips"})
    with pytest.raises(ConfigError, match="regression.enabled.*one timestep"):
        resolve(text_cfg("sdxl", tiny["sdxl"], **{"regression.enabled": True, "generator.timesteps": [999, 499]}))


def test_lpips_distance_on_decoded_latents(tiny, tmp_path):
    """LPIPS from a local whole state dict only: 0 for equal latents, > 0 and differentiable
    through the VAE decoder for different ones; a missing or partial file names the key."""
    import lpips
    from diffusers import AutoencoderKL

    from dmdscale.core.regression import load_lpips, regression_distance
    from dmdscale.data.latents import vae_latent_shape

    weights = tmp_path / "lpips_vgg.pth"
    state = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False).state_dict()
    # Random weights, but non-negative linear heads as trained LPIPS has (a distance, never < 0).
    torch.save({k: v.abs() if k.startswith("lin") else v for k, v in state.items()}, weights)
    cfg = text_cfg("sdxl", tiny["sdxl"], **{"regression.metric": "lpips", "regression.lpips_weights": str(weights)})
    vae = AutoencoderKL.from_pretrained(tiny["sdxl"], subfolder="vae")
    distance = regression_distance(cfg, vae)
    generator = torch.Generator().manual_seed(0)
    target = torch.randn((2, *vae_latent_shape(tiny["sdxl"], 32)), generator=generator)
    student = torch.randn(target.shape, generator=generator, requires_grad=True)
    loss = distance(student, target)
    loss.backward()
    assert loss > 0 and student.grad is not None and student.grad.abs().sum() > 0
    assert float(distance(target, target)) < 1e-6
    with pytest.raises(ConfigError, match="regression.lpips_weights"):
        load_lpips(tmp_path / "missing.pth")
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, tmp_path / "heads_only.pth")
    with pytest.raises(ConfigError, match="not a whole VGG LPIPS state dict"):
        load_lpips(tmp_path / "heads_only.pth")
