"""sd3 and flux: flow-matching transformer teachers (`SD3Transformer2DModel`, `FluxTransformer2DModel`)
as dmdscale Denoisers, on a `FlowMatchSchedule` (x_t = (1 - s) x0 + s eps, velocity prediction).

Conditioning is a dict of text embeddings, one row per sample, as the diffusers pipelines'
`encode_prompt` computes them (`dmdscale.models.text_encoders.PromptEncoder`):
  * sd3: ``prompt_embeds`` (B, 77 + 256, 4096): CLIP-L and CLIP-G penultimate states, padded to
    T5's width, then T5's tokens; ``pooled_prompt_embeds`` (B, 2048): both CLIP projections.
    CFG takes the empty prompt's embeddings as the unconditional input, as the pipeline does.
  * flux: ``prompt_embeds`` (B, 512, 4096) from T5, ``pooled_prompt_embeds`` (B, 768) from CLIP-L.
    FLUX.1-dev is guidance-distilled: the guidance scale is an input embedding (one pass), so
    `forward(..., guidance_scale)` feeds it to the model instead of running CFG.
Latents are plain (B, C, h, w) for both; the flux model packs 2x2 patches into tokens itself.
The discriminator reads the image tokens after chosen blocks (`features`).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from dmdscale.core.schedule import FlowMatchSchedule
from dmdscale.core.networks import Cond
from dmdscale.models.hub import check_pipeline_parts
from dmdscale.models.transformer import TransformerDenoiser
from dmdscale.models.text_encoders import PromptEncoder
from dmdscale.models.variants import FLUX_DEFAULT_GUIDANCE, flow_variant

def transformer_class(family: str) -> type:
    import diffusers

    return getattr(diffusers, flow_variant(family).transformer_class)


def vae_scale_factor(vae_config: dict[str, Any]) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def image_seq_len(resolution: int, vae_scale: int, patch: int = 2) -> int:
    """Image tokens at `resolution` px: both pipelines' token count for the resolution shift
    (2x2 patches of the latent: SD3's patch_size, FLUX's packing)."""
    side = resolution // vae_scale // patch
    return side * side


class FlowTransformer(TransformerDenoiser):
    """x0 = model(x_t, t, {"prompt_embeds", "pooled_prompt_embeds"}, guidance_scale) for sd3/flux."""

    def __init__(self, transformer: torch.nn.Module, schedule: FlowMatchSchedule, family: str,
                 null_cond: dict[str, Tensor] | None = None, feature_depths: list[int] | None = None,
                 vae_scale: int = 8):
        super().__init__(schedule, transformer, feature_depths, vae_scale)
        self.variant = flow_variant(family)
        if not self.variant.embedded_guidance and null_cond is None:
            raise ValueError(f"{family} needs the empty prompt's embeddings as its unconditional input")
        # (1, ...) each; buffers so they follow .to(device) and are saved with nothing else.
        for key, value in (null_cond or {}).items():
            self.register_buffer(f"null_{key}", value, persistent=False)

    def null_cond(self, cond: Cond) -> Cond:
        if self.variant.embedded_guidance:
            return None
        n = len(cond["prompt_embeds"])
        return {k: getattr(self, f"null_{k}").expand(n, *v.shape[1:]).to(v.dtype) for k, v in cond.items()}

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond = None, guidance_scale: float = 1.0) -> Tensor:
        if not self.variant.embedded_guidance:
            return super().forward(x_t, t, cond, guidance_scale)
        # Guidance-distilled: one pass with the scale as input. 1.0 (what the step passes for the
        # generator and the fake score) means the pipeline's default, which the student keeps.
        guidance = FLUX_DEFAULT_GUIDANCE if guidance_scale == 1.0 else guidance_scale
        return self.schedule.to_x0(self._flux(x_t, t, cond, guidance), x_t, t, self.prediction_type)

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        if self.variant.embedded_guidance:
            return self._flux(x_t, t, cond, FLUX_DEFAULT_GUIDANCE)
        return self.transformer(hidden_states=x_t, timestep=self.schedule.model_timesteps(t).to(x_t.dtype),
                                encoder_hidden_states=cond["prompt_embeds"],
                                pooled_projections=cond["pooled_prompt_embeds"]).sample

    # -- flux: packed tokens -------------------------------------------------------------------
    def _flux_inputs(self, x_t: Tensor, t: Tensor, cond: Cond, guidance: float) -> dict[str, Any]:
        from diffusers import FluxPipeline

        b, c, h, w = x_t.shape
        dtype = cond["prompt_embeds"].dtype
        embeds_guidance = self.transformer.config.guidance_embeds
        return {"hidden_states": FluxPipeline._pack_latents(x_t, b, c, h, w),
                # FluxPipeline passes timestep / 1000: the sigma itself.
                "timestep": (self.schedule.model_timesteps(t) / self.schedule.num_train_timesteps).to(x_t.dtype),
                "guidance": torch.full((b,), guidance, device=x_t.device, dtype=torch.float32) if embeds_guidance
                else None,
                "pooled_projections": cond["pooled_prompt_embeds"], "encoder_hidden_states": cond["prompt_embeds"],
                "txt_ids": torch.zeros(cond["prompt_embeds"].shape[1], 3, device=x_t.device, dtype=dtype),
                "img_ids": FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, dtype)}

    def _flux(self, x_t: Tensor, t: Tensor, cond: Cond, guidance: float) -> Tensor:
        from diffusers import FluxPipeline

        h, w = x_t.shape[-2:]
        out = self.transformer(**self._flux_inputs(x_t, t, cond, guidance)).sample
        return FluxPipeline._unpack_latents(out, h * self.vae_scale, w * self.vae_scale, self.vae_scale)

    # -- the discriminator's features --------------------------------------------------------
    def features(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """The image tokens after each of `feature_depths` blocks, (B, depths, tokens, width): the
        transformers' forward (diffusers 0.42, without ControlNet/IP-adapter inputs) up to the
        deepest one, so the head does not pay for the blocks after it."""
        tr, blocks = self.transformer, self.blocks
        if self.variant.embedded_guidance:
            inputs = self._flux_inputs(x_t, t, cond, FLUX_DEFAULT_GUIDANCE)
            hidden = tr.x_embedder(inputs["hidden_states"])
            timestep = inputs["timestep"].to(hidden.dtype) * 1000
            temb = (tr.time_text_embed(timestep, inputs["pooled_projections"]) if inputs["guidance"] is None else
                    tr.time_text_embed(timestep, inputs["guidance"].to(hidden.dtype) * 1000,
                                       inputs["pooled_projections"]))
            context = tr.context_embedder(inputs["encoder_hidden_states"])
            extra = {"image_rotary_emb": tr.pos_embed(torch.cat((inputs["txt_ids"], inputs["img_ids"])))}
        else:
            hidden = tr.pos_embed(x_t).contiguous()
            temb = tr.time_text_embed(self.schedule.model_timesteps(t).to(x_t.dtype), cond["pooled_prompt_embeds"])
            context = tr.context_embedder(cond["prompt_embeds"])
            extra = {}
        out = []
        for depth, block in enumerate(blocks[:max(self.feature_depths)], start=1):
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb, **extra)
            if depth in self.feature_depths:
                out.append(hidden)
        return torch.stack(out, dim=1)


def check_flow_folder(path: str | os.PathLike, family: str) -> str:
    """A local teacher folder holds what `family` needs (a hub id passes through)."""
    return check_pipeline_parts(path, family, flow_variant(family).components)


def load_flow_teacher(path_or_hub_id: str | os.PathLike, family: str, resolution: int,
                      dtype: torch.dtype = torch.float32, feature_depths: list[int] | None = None) -> FlowTransformer:
    """The frozen teacher of a diffusers SD3/FLUX pipeline (local folder or hub id), for images of
    `resolution` px (FLUX's timestep shift depends on it). Loads the transformer and the
    scheduler's config; for sd3 encodes the empty prompt once (CFG's unconditional input), after
    which the text encoders are dropped: training reads precomputed embeddings."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    p = check_flow_folder(path_or_hub_id, family)
    try:
        transformer = transformer_class(family).from_pretrained(p, subfolder="transformer", torch_dtype=dtype)
        scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(p, subfolder="scheduler"))
        scale = vae_scale_factor(AutoencoderKL.load_config(p, subfolder="vae"))
    except (OSError, ValueError) as e:
        raise OSError(f"could not load the {family} teacher from {p!r}: {e}") from e
    null = None
    if not flow_variant(family).embedded_guidance:
        null = {k: v.to(dtype) for k, v in PromptEncoder.load(p, family).encode([""]).items()}
    schedule = FlowMatchSchedule(scheduler_config, image_seq_len(resolution, scale))
    model = FlowTransformer(transformer, schedule, family, null, feature_depths, scale)
    return model.eval().requires_grad_(False)
