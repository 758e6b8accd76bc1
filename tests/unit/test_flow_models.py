"""sd3/flux Denoisers on tiny random-weight pipelines: the same arithmetic as the diffusers
pipelines' own sampling, the discriminator's token features, one DMD2 iteration, and the export."""
from __future__ import annotations

import json

import pytest
import torch

from dmdscale.core.networks import Critic
from dmdscale.families.flow.model import load_flow_teacher
from dmdscale.models.variants import FLUX_DEFAULT_GUIDANCE
from dmdscale.models.heads import TokenHead
from dmdscale.models.text_encoders import PromptEncoder

FAMILIES = ("sd3", "flux")
PROMPTS = ["a handwritten digit 4", "a cat"]




def pipeline_of(folder: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_from_pure_noise_is_the_pipelines_own_euler_step(tiny_flow, family):
    """At t = 999 (sigma 1) the pipeline's one Euler step lands on x0 = x - v: the Denoiser must
    give the same latents, with the pipeline's own text conditioning and guidance."""
    from diffusers import FluxPipeline

    pipe, model = pipeline_of(tiny_flow[family]), load_flow_teacher(tiny_flow[family], family, 32)
    cond = PromptEncoder.load(tiny_flow[family], family).encode(PROMPTS)
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    call = dict(prompt_embeds=cond["prompt_embeds"], pooled_prompt_embeds=cond["pooled_prompt_embeds"], height=32,
                width=32, num_inference_steps=1, output_type="latent")
    if family == "flux":  # guidance-distilled: the scale is an input, one pass
        expected = FluxPipeline._unpack_latents(
            pipe(latents=FluxPipeline._pack_latents(noise, 2, 16, 16, 16), guidance_scale=5.0, **call).images,
            32, 32, 2)
        got = model(noise, torch.full((2,), 999), cond, guidance_scale=5.0)
        assert not torch.allclose(got, model(noise, torch.full((2,), 999), cond))  # the default 3.5 differs
    else:  # CFG against the empty prompt, as the pipeline encodes it
        negative = PromptEncoder.load(tiny_flow[family], family).encode(["", ""])
        expected = pipe(latents=noise, guidance_scale=4.0, negative_prompt_embeds=negative["prompt_embeds"],
                        negative_pooled_prompt_embeds=negative["pooled_prompt_embeds"], **call).images
        got = model(noise, torch.full((2,), 999), cond, guidance_scale=4.0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_features_at_chosen_depths_feed_one_head_per_depth(tiny_flow, family):
    model = load_flow_teacher(tiny_flow[family], family, 32, feature_depths=[1, 2])
    cond = PromptEncoder.load(tiny_flow[family], family).encode(PROMPTS)
    x, t = torch.randn(2, 16, 16, 16), torch.tensor([999, 100])
    features = model.features(x, t, cond)
    assert features.shape == (2, 2, 64, model.feature_width)  # 8x8 patches of 2x2 latents
    assert not torch.allclose(features[:, 0], features[:, 1])
    logits = Critic(model, TokenHead.for_model(model))(x, t, cond)
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="gan_feature_depths"):
        load_flow_teacher(tiny_flow[family], family, 32, feature_depths=[model.num_blocks + 1])


@pytest.mark.parametrize("family", FAMILIES)
def test_step_conditioned_critic_conditions_the_transformers_time_embedding(tiny_flow, family):
    model = load_flow_teacher(tiny_flow[family], family, 32)
    cond = PromptEncoder.load(tiny_flow[family], family).encode(PROMPTS)
    x, t = torch.randn(2, 16, 16, 16), torch.tensor([999, 100])
    critic = Critic(model, TokenHead.for_model(model), 2)
    with torch.no_grad():
        shared = critic.fake_score(x, t, cond), critic(x, t, cond)
        critic.step_embedding.weight[1] = 0.5
        with critic.at_step(0):
            torch.testing.assert_close(critic.fake_score(x, t, cond), shared[0], rtol=0, atol=0)
        with critic.at_step(1):
            assert not torch.allclose(critic.fake_score(x, t, cond), shared[0])
            assert not torch.allclose(critic(x, t, cond), shared[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_one_dmd2_iteration_trains_generator_and_flow_matching_fake_score(tiny_flow, family):
    import copy

    from dmdscale.config import build_config
    from dmdscale.core.optim import TorchOptimizedModule
    from dmdscale.core.step import Batch, DMD2Step

    cfg = build_config({}, {"model.family": family, "model.teacher": tiny_flow[family], "data.channels": 3,
                            "data.resolution": 32, "train.warmup_steps": 0, "train.ttur_ratio": 1,
                            "loss.gan_generator_weight": 0.01, "loss.gan_critic_weight": 0.01,
                            "loss.guidance_scale": 2.0})
    teacher = load_flow_teacher(tiny_flow[family], family, 32)
    generator = copy.deepcopy(teacher).train().requires_grad_(True)
    fake = copy.deepcopy(teacher).train().requires_grad_(True)
    for model in (generator, fake):  # train.gradient_checkpointing, through the transformer's own switch
        model.enable_gradient_checkpointing()
    assert generator.transformer.gradient_checkpointing
    critic = Critic(fake, TokenHead.for_model(fake))
    gen_opt, critic_opt = (TorchOptimizedModule(m, cfg.train, role=r) for m, r in
                           ((generator, "generator"), (critic, "critic")))
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    cond = PromptEncoder.load(tiny_flow[family], family).encode(PROMPTS)
    metrics = DMD2Step(cfg, teacher, gen_opt, critic_opt)(Batch(torch.randn(2, 16, 16, 16), cond), 0)
    assert metrics["nonfinite_generator"] == 0 and metrics["nonfinite_critic"] == 0
    assert all(metrics[k] > 0 for k in ("loss_dm", "loss_fake_score", "loss_gan_critic"))
    assert any(not torch.equal(before[k], v) for k, v in generator.state_dict().items())


@pytest.mark.parametrize("family,timesteps,call", [
    ("sd3", [999], {"num_inference_steps": 1, "guidance_scale": 1.0}),
    ("sd3", [999, 749, 499, 249], {"sigmas": [1.0, 0.75, 0.5, 0.25], "guidance_scale": 1.0}),
    ("flux", [999, 749, 499, 249], {"num_inference_steps": 4}),
])
def test_exported_student_samples_at_its_trained_timesteps(tiny_flow, tmp_path, family, timesteps, call):
    """The export loads with stock diffusers, its recorded call runs exactly the trained
    sigmas, and a one-step student's output equals the Denoiser's x0."""
    from dmdscale.export import STUDENT_INFO
    from dmdscale.families.flow.export import export_flow_pipeline

    model = load_flow_teacher(tiny_flow[family], family, 32)
    out = export_flow_pipeline(tiny_flow[family], family, model.transformer, timesteps, tmp_path / "student", 32)
    info = json.loads((out / STUDENT_INFO).read_text())
    assert info["call"] == call and info["timesteps"] == timesteps and info["resolution"] == 32
    assert info["guidance_scale"] == (FLUX_DEFAULT_GUIDANCE if family == "flux" else 1.0)
    pipe = pipeline_of(str(out))
    assert type(pipe).__name__ == {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family]
    seen = []
    pipe.transformer.register_forward_hook(lambda m, a, kw, o: seen.append(float(kw["timestep"].flatten()[0])),
                                           with_kwargs=True)
    images = pipe(PROMPTS[:1], height=32, width=32, output_type="np", **call).images
    assert images.shape == (1, 32, 32, 3)
    expected = model.schedule.flow_sigmas[torch.tensor(timesteps)].float()
    scale = 1000.0 if family == "sd3" else 1.0  # FluxPipeline passes timestep / 1000
    torch.testing.assert_close(torch.tensor(seen) / scale, expected, rtol=1e-4, atol=1e-4)
