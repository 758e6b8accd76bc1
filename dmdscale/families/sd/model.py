"""sd: Stable Diffusion 1.5 and SDXL latent UNets (`UNet2DConditionModel`) as dmdscale Denoisers.

Conditioning is a dict of text embeddings, one row per sample:
  * SD1.5: ``prompt_embeds`` (B, 77, 768), the CLIP text encoder's last hidden state;
  * SDXL: ``prompt_embeds`` (B, 77, 2048), the penultimate hidden states of both encoders
    concatenated, and ``pooled_prompt_embeds`` (B, 1280), encoder 2's projected pooled output.
SDXL's micro-conditioning ``add_time_ids`` is (H, W, 0, 0, H, W) of the training resolution,
built here from the latent size, so data carries only text. The unconditional input for CFG is
the empty prompt's embedding for SD1.5 and zeros for SDXL, as in the DMD2 authors' code.
"""
from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import Tensor

from dmdscale.core.schedule import NoiseSchedule
from dmdscale.core.networks import Cond, Denoiser
from dmdscale.models.hub import check_pipeline_parts
from dmdscale.models.text_encoders import PromptEncoder
from dmdscale.models.variants import sd_variant


def check_pipeline_folder(path: str | os.PathLike, family: str) -> str:
    """A local teacher folder holds the components of `family`'s SD variant (a hub id passes
    through); TeacherNotFound names what is missing."""
    return check_pipeline_parts(path, family, sd_variant(family).components)


class TextConditionalUNet(Denoiser):
    """x0 = model(x_t, t, {"prompt_embeds", ["pooled_prompt_embeds"]}, guidance_scale)."""

    def __init__(self, unet: UNet2DConditionModel, schedule: NoiseSchedule, family: str,
                 null_prompt_embeds: Tensor | None = None, vae_scale_factor: int = 8):
        super().__init__(schedule)
        self.variant = sd_variant(family)
        self.unet, self.vae_scale_factor = unet, vae_scale_factor
        self.prediction_type = str(schedule.scheduler_config.get("prediction_type", "epsilon"))
        if not self.variant.zero_uncond and null_prompt_embeds is None:
            raise ValueError(f"{family} needs the empty prompt's embedding as its unconditional input")
        # (1, L, D); a buffer so it follows .to(device) and is saved with nothing else.
        self.register_buffer("null_prompt_embeds", null_prompt_embeds, persistent=False)

    @property
    def feature_channels(self) -> int:
        """Channels of the mid-block output, for sizing the discriminator head."""
        return int(self.unet.config.block_out_channels[-1])

    def null_cond(self, cond: Cond) -> Cond:
        if self.variant.zero_uncond:
            return {k: torch.zeros_like(v) for k, v in cond.items()}
        n = len(cond["prompt_embeds"])
        return {"prompt_embeds": self.null_prompt_embeds.expand(n, -1, -1).to(cond["prompt_embeds"].dtype)}

    def _unet_kwargs(self, x_t: Tensor, cond: Cond) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": cond["prompt_embeds"]}
        if self.variant.micro_conditioning:
            h, w = (s * self.vae_scale_factor for s in x_t.shape[-2:])
            time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=cond["prompt_embeds"].dtype, device=x_t.device)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled_prompt_embeds"],
                                           "time_ids": time_ids.expand(len(x_t), -1)}
        return kwargs

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        return self.unet(x_t, t, **self._unet_kwargs(x_t, cond)).sample

    def time_embedding_layer(self) -> tuple[torch.nn.Module, int]:
        return self.unet.time_embedding, int(self.unet.time_embedding.linear_2.out_features)

    def features(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """The mid-block output (B, C, h, w): `UNet2DConditionModel.forward` up to its mid block
        (diffusers 0.42, without ControlNet/adapter residuals), so the GAN head does not pay for
        the decoder."""
        unet, kwargs = self.unet, self._unet_kwargs(x_t, cond)
        hidden = kwargs["encoder_hidden_states"]
        emb = unet.time_embedding(unet.get_time_embed(sample=x_t, timestep=t))
        aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=hidden,
                                 added_cond_kwargs=kwargs.get("added_cond_kwargs", {}))
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        sample = unet.conv_in(x_t)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, _ = block(hidden_states=sample, temb=emb, encoder_hidden_states=hidden)
            else:
                sample, _ = block(hidden_states=sample, temb=emb)
        if getattr(unet.mid_block, "has_cross_attention", False):
            return unet.mid_block(sample, emb, encoder_hidden_states=hidden)
        return unet.mid_block(sample, emb)


def load_sd_teacher(path_or_hub_id: str | os.PathLike, family: str,
                    dtype: torch.dtype = torch.float32) -> TextConditionalUNet:
    """The frozen teacher of a diffusers SD1.5/SDXL pipeline (local folder or hub id).

    Loads the UNet, the scheduler's config and, for SD1.5, encodes the empty prompt once (the
    unconditional input); the text encoders are not kept: training reads precomputed embeddings.
    """
    p = check_pipeline_folder(path_or_hub_id, family)
    try:
        unet = UNet2DConditionModel.from_pretrained(p, subfolder="unet", torch_dtype=dtype)
        scheduler_config = DDPMScheduler.load_config(p, subfolder="scheduler")
        vae_config = _vae_config(p)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load the {family} teacher from {p!r}: {e}") from e
    null = None
    if not sd_variant(family).zero_uncond:
        null = PromptEncoder.load(p, family).encode([""])["prompt_embeds"].to(dtype)
    scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    model = TextConditionalUNet(unet, NoiseSchedule(dict(scheduler_config)), family, null, scale)
    return model.eval().requires_grad_(False)


def _vae_config(p: str) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    return dict(AutoencoderKL.load_config(p, subfolder="vae"))
