"""SD1.5 / SDXL teachers: adapters, prompt encoding, DMD2 steps, LoRA (latent data: tests/ray/test_latents.py).

Tiny pipelines built from configs with random weights (dmdscale.families.sd.tiny): same classes and
code paths as the real models, nothing downloaded.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import text_cfg

from dmdscale.config import build_config
from dmdscale.core.optim import TorchOptimizedModule
from dmdscale.core.step import Batch, DMD2Step
from dmdscale.distributed.worker import build_players
from dmdscale.core.networks import Critic
from dmdscale.models.heads import ConvHead
from dmdscale.families.sd.model import check_pipeline_folder, load_sd_teacher
from dmdscale.models.text_encoders import PromptEncoder
from dmdscale.families.sd.tiny import build_tiny_pipeline
from dmdscale.families import resolve

FAMILIES = ["sd15", "sdxl"]
PROMPTS = ["a handwritten digit 3", "a handwritten digit 7", "", "digit 0"]


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_encoder_matches_the_diffusers_pipeline(tiny, family):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny[family])
    ours = PromptEncoder.load(tiny[family], family).encode(PROMPTS)
    theirs = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    torch.testing.assert_close(ours["prompt_embeds"], theirs[0])
    if family == "sdxl":
        torch.testing.assert_close(ours["pooled_prompt_embeds"], theirs[2])  # (embeds, neg, pooled, neg pooled)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_matches_the_unet_call_the_pipeline_makes(tiny, family):
    """x0 from the adapter equals the UNet called as the diffusers pipeline calls it (for SDXL
    with its add_time_ids for the resolution), and CFG uses the family's unconditional input."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny[family])
    teacher = load_sd_teacher(tiny[family], family)
    cond = PromptEncoder.load(tiny[family], family).encode(PROMPTS[:2])
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([999, 400])
    kwargs = {}
    if family == "sdxl":
        time_ids = pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": time_ids.repeat(2, 1)}
    eps = pipe.unet(x, t, encoder_hidden_states=cond["prompt_embeds"], **kwargs).sample
    torch.testing.assert_close(teacher.predict(x, t, cond), eps)

    uncond = teacher.null_cond(cond)
    if family == "sd15":  # the empty prompt's embedding
        empty = PromptEncoder.load(tiny[family], family).encode(["", ""])
        torch.testing.assert_close(uncond["prompt_embeds"], empty["prompt_embeds"])
    else:  # zeros for both embeddings, as the DMD2 authors' SDXL code
        assert all(torch.count_nonzero(v) == 0 for v in uncond.values())
    guided = teacher(x, t, cond, guidance_scale=8.0)
    x0_c, x0_u = teacher(x, t, cond), teacher(x, t, uncond)
    # Guided runs cond and uncond in one batched forward; the scale 8 multiplies the fp32
    # difference from two separate forwards (1.7e-4 measured on one CPU): a wrong
    # unconditional input or scale is off by O(1).
    torch.testing.assert_close(guided, x0_u + 8.0 * (x0_c - x0_u), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_features_are_the_mid_block_output(tiny, family):
    teacher = load_sd_teacher(tiny[family], family)
    cond = PromptEncoder.load(tiny[family], family).encode(PROMPTS[:2])
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    seen = {}
    hook = teacher.unet.mid_block.register_forward_hook(lambda m, i, o: seen.setdefault("mid", o))
    teacher.predict(x, t, cond)
    hook.remove()
    torch.testing.assert_close(teacher.features(x, t, cond), seen["mid"])
    assert seen["mid"].shape[1] == teacher.feature_channels

    # A step-conditioned critic on it adds its step embedding to the UNet's time embedding.
    critic = Critic(teacher, ConvHead.for_model(teacher), 4)
    with torch.no_grad():
        x0 = teacher(x, t, cond)
        critic.step_embedding.weight[3] = 0.5
        with critic.at_step(3):
            assert not torch.allclose(critic.fake_score(x, t, cond), x0)
            assert not torch.allclose(critic.fake_score.features(x, t, cond), seen["mid"])
        torch.testing.assert_close(critic.fake_score(x, t, cond), x0, rtol=0, atol=0)


def test_a_folder_missing_components_is_named(tmp_path, tiny):
    shutil.copytree(tiny["sdxl"], tmp_path / "broken")
    shutil.rmtree(tmp_path / "broken" / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        check_pipeline_folder(tmp_path / "broken", "sdxl")
    assert check_pipeline_folder("stabilityai/stable-diffusion-xl-base-1.0", "sdxl").startswith("stabilityai/")


@pytest.mark.parametrize("family,lora", [("sd15", False), ("sdxl", False), ("sdxl", True)])
def test_dmd2_steps_on_a_text_teacher(tiny, family, lora):
    """Three DMD2 iterations (GAN on, CFG 8, multi-step with backward simulation, gradient
    checkpointing): finite losses, the generator moves; with LoRA only the adapter moves."""
    cfg = text_cfg(family, tiny[family], **{"lora.enabled": lora, "lora.rank": 4, "train.ttur_ratio": 1,
                                            "generator.timesteps": [999, 749, 499, 249],
                                            "loss.gan_generator_weight": 5e-3, "loss.gan_critic_weight": 1e-2,
                                            "loss.guidance_scale": 8.0, "train.gradient_checkpointing": True})
    teacher, generator, critic = build_players(cfg, resolve(cfg), tiny[family], torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in generator.named_parameters()}
    step = DMD2Step(cfg, teacher, TorchOptimizedModule(generator, cfg.train, role="generator"),
                    TorchOptimizedModule(critic, cfg.train, role="critic"))
    batch = Batch(torch.randn(4, 4, 16, 16), PromptEncoder.load(tiny[family], family).encode(PROMPTS))
    for s in range(3):
        metrics = step(batch, s)
        assert metrics["nonfinite_generator"] == 0 and metrics["nonfinite_critic"] == 0
        assert np.isfinite([metrics["loss_dm"], metrics["loss_gan_generator"], metrics["loss_gan_critic"]]).all()
    changed = {n for n, p in generator.named_parameters() if not torch.equal(before[n], p)}
    assert changed
    if lora:
        assert all("lora_" in n for n in changed)
        assert any("lora_B" in n for n in changed)
    else:
        assert not any("lora_" in n for n in before)


def test_a_v_prediction_teacher_is_read_from_its_scheduler(tmp_path):
    """eps and v teachers plug in without code changes: x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
    folder = build_tiny_pipeline("sd15", tmp_path / "v", prediction_type="v_prediction")
    teacher = load_sd_teacher(folder, "sd15")
    assert teacher.prediction_type == "v_prediction"
    cond = PromptEncoder.load(folder, "sd15").encode(PROMPTS[:2])
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([100, 700])
    abar = teacher.schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    v = teacher.unet(x, t, encoder_hidden_states=cond["prompt_embeds"]).sample
    torch.testing.assert_close(teacher(x, t, cond), abar.sqrt() * x - (1 - abar).sqrt() * v)


def test_text_family_config_errors_name_the_key():
    from dmdscale.config import ConfigError

    with pytest.raises(ConfigError, match="model.teacher"):
        resolve(build_config({}, {"model.family": "sdxl"}))
    with pytest.raises(ConfigError, match="data.channels"):
        resolve(build_config({}, {"model.family": "sd15", "model.teacher": "x", "data.channels": 1}))
    with pytest.raises(ConfigError, match="rollout.mode"):
        resolve(build_config({}, {"model.family": "sdxl", "model.teacher": "x", "data.channels": 3,
                                  "lora.enabled": True, "rollout.mode": "actors"}))
