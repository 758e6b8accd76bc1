"""What differs between the teachers of one kind, as data: the Stable Diffusion UNet variants
(sd15, sdxl) and the flow-matching transformer variants (sd3, flux). The adapters (sd, flow) and
the prompt encoders (text_encoders) read them here."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SDVariant:
    """What differs between the Stable Diffusion UNet teachers dmdscale knows, as data."""

    name: str
    # A second CLIP encoder (penultimate states of both concatenated; encoder 2's pooled output).
    dual_text_encoder: bool
    # Zeros as the unconditional input (SDXL, as in the DMD2 authors' code); else the empty
    # prompt's embedding.
    zero_uncond: bool
    # SDXL's micro-conditioning: pooled text embeds and add_time_ids (H, W, 0, 0, H, W).
    micro_conditioning: bool

    @property
    def components(self) -> list[str]:
        """What a local pipeline folder must hold for this variant."""
        parts = ["unet/config.json", "scheduler/scheduler_config.json", "vae/config.json",
                 "text_encoder/config.json", "tokenizer"]
        return parts + (["text_encoder_2/config.json", "tokenizer_2"] if self.dual_text_encoder else [])


SD_VARIANTS = {v.name: v for v in (
    SDVariant("sd15", dual_text_encoder=False, zero_uncond=False, micro_conditioning=False),
    SDVariant("sdxl", dual_text_encoder=True, zero_uncond=True, micro_conditioning=True),
)}


def sd_variant(name: str) -> SDVariant:
    if name not in SD_VARIANTS:
        raise ValueError(f"unknown Stable Diffusion variant {name!r}; known: {', '.join(SD_VARIANTS)}")
    return SD_VARIANTS[name]


# FluxPipeline's default guidance_scale: a flux student is trained at this embedded guidance, so
# the exported pipeline samples it with no guidance argument.
FLUX_DEFAULT_GUIDANCE = 3.5


@dataclass(frozen=True)
class FlowVariant:
    """What differs between the flow-matching transformer teachers dmdscale knows, as data."""

    name: str
    pipeline_class: str  # the diffusers pipeline the teacher folder and the exported student are
    transformer_class: str
    components: tuple[str, ...]  # what a local pipeline folder must hold
    # The guidance scale is an input of the network (FLUX.1-dev), not two passes (CFG); such a
    # student keeps the pipeline's default guidance, a CFG one is sampled at guidance_scale 1.
    embedded_guidance: bool
    # The pipeline passes its own linear sigmas for a step count (FluxPipeline) rather than
    # letting the scheduler space them (StableDiffusion3Pipeline).
    pipeline_spaces_sigmas: bool


_SD3_PARTS = ("transformer/config.json", "scheduler/scheduler_config.json", "vae/config.json",
              "text_encoder/config.json", "text_encoder_2/config.json", "text_encoder_3/config.json",
              "tokenizer", "tokenizer_2", "tokenizer_3")
FLOW_VARIANTS = {v.name: v for v in (
    FlowVariant("sd3", "StableDiffusion3Pipeline", "SD3Transformer2DModel", _SD3_PARTS, embedded_guidance=False,
                pipeline_spaces_sigmas=False),
    FlowVariant("flux", "FluxPipeline", "FluxTransformer2DModel",
                ("transformer/config.json", "scheduler/scheduler_config.json", "vae/config.json",
                 "text_encoder/config.json", "text_encoder_2/config.json", "tokenizer", "tokenizer_2"),
                embedded_guidance=True, pipeline_spaces_sigmas=True),
)}


def flow_variant(name: str) -> FlowVariant:
    if name not in FLOW_VARIANTS:
        raise ValueError(f"unknown flow-matching family {name!r}; known: {', '.join(FLOW_VARIANTS)}")
    return FLOW_VARIANTS[name]
