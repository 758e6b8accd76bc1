"""Tiny SD3/FLUX pipelines, their prompt encoding and latent data (dmdscale.families.flow.tiny,
dmdscale.models.text_encoders, dmdscale.data.latents)."""
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline

from dmdscale.data.latents import LatentEncoder, PromptOnlyEncoder, vae_latent_shape
from dmdscale.families import FAMILIES as FAMILY_OBJECTS
from dmdscale.families.flow.tiny import build_tiny_flow_pipeline
from dmdscale.models.text_encoders import PromptEncoder

PROMPTS = ["a red cat", "Two dogs, 3 birds"]
FAMILIES = ("sd3", "flux")
PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
# (prompt_embeds (L, D), pooled_prompt_embeds (P,)) of the tiny models: SD3 = 32 CLIP tokens then
# 256 T5 tokens at T5's width 96, both CLIP projections (2 x 32); FLUX = 512 T5 tokens, CLIP's 32.
COND_SHAPES = {"sd3": ((32 + 256, 96), (64,)), "flux": ((512, 96), (32,))}




@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_flow_pipeline_loads_and_generates(tiny_flow, family):
    pipe = DiffusionPipeline.from_pretrained(tiny_flow[family])
    assert type(pipe) is PIPELINES[family]
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor > 0
    assert pipe.scheduler.config.use_dynamic_shifting == (family == "flux")
    images = pipe(PROMPTS, num_inference_steps=2, height=32, width=32, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()


def test_an_unknown_flow_family_is_named(tmp_path):
    with pytest.raises(ValueError, match="'sd4'"):
        build_tiny_flow_pipeline("sd4", tmp_path / "x")


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_encoder_is_the_pipelines_encode_prompt(tiny_flow, family):
    encoder = PromptEncoder.load(tiny_flow[family], family)
    assert encoder.pipe.transformer is None and encoder.pipe.vae is None  # text weights only
    ours = encoder.encode(PROMPTS)
    embeds_shape, pooled_shape = COND_SHAPES[family]
    assert ours["prompt_embeds"].shape == (2, *embeds_shape)
    assert ours["pooled_prompt_embeds"].shape == (2, *pooled_shape)
    assert all(v.dtype == torch.float32 for v in ours.values())

    pipe = DiffusionPipeline.from_pretrained(tiny_flow[family])
    with torch.no_grad():
        if family == "sd3":
            embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
        else:
            embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None)
    assert torch.equal(ours["prompt_embeds"], embeds) and torch.equal(ours["pooled_prompt_embeds"], pooled)
    for value in ours.values():  # the two prompts are told apart
        assert not torch.allclose(value[0], value[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_latents_of_a_flow_teacher(tiny_flow, family):
    teacher = tiny_flow[family]
    assert vae_latent_shape(teacher, 32) == (16, 16, 16)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32)
    rows = LatentEncoder(FAMILY_OBJECTS[family], teacher)({"image": images, "prompt": np.array(PROMPTS)})
    assert rows["latent"].shape == (2, 16, 16, 16) and rows["latent"].dtype == np.float32

    # The posterior mean, shifted then scaled by the teacher's own factors.
    vae = AutoencoderKL.from_pretrained(teacher, subfolder="vae")
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(images)).latent_dist.mean
    expected = (mean - vae.config.shift_factor) * vae.config.scaling_factor
    np.testing.assert_allclose(rows["latent"], expected.numpy(), rtol=1e-5, atol=1e-5)

    text = PromptEncoder.load(teacher, family).encode(PROMPTS)
    prompt_rows = PromptOnlyEncoder(FAMILY_OBJECTS[family], teacher, 32)({"prompt": np.array(PROMPTS)})
    assert prompt_rows["latent"].shape == (2, 16, 16, 16) and not prompt_rows["latent"].any()
    for key, value in text.items():
        np.testing.assert_array_equal(rows[key], value.numpy())
        np.testing.assert_array_equal(prompt_rows[key], value.numpy())


def test_sd15_vae_latent_shape_is_unchanged(tiny):
    assert vae_latent_shape(tiny["sd15"], 32) == (4, 16, 16)
