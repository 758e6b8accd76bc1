"""qwenimage: the Qwen-Image MMDiT (`QwenImageTransformer2DModel`) as a dmdscale Denoiser, on a
`FlowMatchSchedule` (x_t = (1 - s) x0 + s eps, velocity prediction).

Conditioning is a dict, one row per sample, as `QwenPromptEncoder` computes it with the pipeline's
own `encode_prompt`: ``prompt_embeds`` (B, L, 3584), Qwen2.5-VL's last hidden state of the prompt
in the pipeline's chat template (its system prefix dropped), zero-padded to a fixed L, and
``prompt_embeds_mask`` (B, L), 1 for a token and 0 for padding (float32). CFG is Qwen-Image's
true CFG: two passes, the unconditional one on the model card's negative prompt " ".
Latents are (B, 16, h, w) and normalised per channel by the VAE's latents_mean / latents_std (see
`encode_latents`); the pipeline packs 2x2 patches into 64-channel tokens and gives its 3D VAE a
frame axis, both added and removed here. The discriminator reads the image tokens after chosen
blocks (`features`).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from dmdscale.core.networks import Cond
from dmdscale.core.schedule import FlowMatchSchedule
from dmdscale.families.qwenimage.text import NEGATIVE_PROMPT, QwenPromptEncoder, fixed_length
from dmdscale.models.hub import check_pipeline_parts
from dmdscale.models.transformer import TransformerDenoiser

FAMILY = "qwenimage"
# What a local Qwen-Image pipeline folder must hold.
COMPONENTS = ("transformer/config.json", "scheduler/scheduler_config.json", "vae/config.json",
              "text_encoder/config.json", "tokenizer")
PATCH = 2  # the pipeline packs 2x2 latent patches into one token
# Transformer options of other Qwen-Image pipelines (edit, layered) that QwenImagePipeline never sets.
UNSUPPORTED_OPTIONS = ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")


def vae_scale_factor(vae_config: dict[str, Any]) -> int:
    """Pixels per latent along each side: QwenImagePipeline's 2 ** len(temperal_downsample) (8)."""
    return 2 ** len(vae_config["temperal_downsample"])


def image_seq_len(resolution: int, vae_scale: int) -> int:
    """Image tokens at `resolution` px (2x2 patches of the latent): the token count the pipeline's
    resolution-dependent shift reads (`latents.shape[1]`), 4096 at 1024 px."""
    side = resolution // vae_scale // PATCH
    return side * side


class QwenImageDenoiser(TransformerDenoiser):
    """x0 = model(x_t, t, {"prompt_embeds", "prompt_embeds_mask"}, guidance_scale) for Qwen-Image."""

    def __init__(self, transformer: torch.nn.Module, schedule: FlowMatchSchedule, null_cond: dict[str, Tensor],
                 feature_depths: list[int] | None = None, vae_scale: int = 8):
        on = [k for k in UNSUPPORTED_OPTIONS if transformer.config.get(k)]
        if on:
            raise ValueError(f"this transformer sets {', '.join(on)}: QwenImageDenoiser runs QwenImagePipeline's "
                             f"text-to-image transformer, which sets none of {', '.join(UNSUPPORTED_OPTIONS)}")
        super().__init__(schedule, transformer, feature_depths, vae_scale)
        # The negative prompt's tokens, (1, n, D) and (1, n), unpadded: buffers so they follow
        # .to(device) and are saved with nothing else; null_cond pads them to the batch's length.
        self.register_buffer("null_prompt_embeds", null_cond["prompt_embeds"], persistent=False)
        self.register_buffer("null_prompt_embeds_mask", null_cond["prompt_embeds_mask"].float(), persistent=False)

    def null_cond(self, cond: Cond) -> Cond:
        """The negative prompt's embedding and mask, at `cond`'s length and dtypes, one row per sample."""
        embeds, mask = cond["prompt_embeds"], cond["prompt_embeds_mask"]
        null = fixed_length(self.null_prompt_embeds, self.null_prompt_embeds_mask, embeds.shape[1])
        return {"prompt_embeds": null["prompt_embeds"].expand(len(embeds), -1, -1).to(embeds.dtype),
                "prompt_embeds_mask": null["prompt_embeds_mask"].expand(len(embeds), -1).to(mask.dtype)}

    def transformer_inputs(self, x_t: Tensor, t: Tensor, cond: Cond) -> dict[str, Any]:
        """The transformer's keyword arguments as QwenImagePipeline builds them: 2x2-packed tokens,
        the sigma as timestep (the pipeline's t / 1000), one (frame, h / 2, w / 2) grid per sample."""
        from diffusers import QwenImagePipeline

        b, c, h, w = x_t.shape
        return {"hidden_states": QwenImagePipeline._pack_latents(x_t, b, c, h, w),
                "timestep": (self.schedule.model_timesteps(t) / self.schedule.num_train_timesteps).to(x_t.dtype),
                "encoder_hidden_states": cond["prompt_embeds"],
                "encoder_hidden_states_mask": cond["prompt_embeds_mask"],
                "img_shapes": [[(1, h // PATCH, w // PATCH)]] * b}

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        from diffusers import QwenImagePipeline

        h, w = x_t.shape[-2:]
        out = self.transformer(**self.transformer_inputs(x_t, t, cond), return_dict=False)[0]
        # (B, C, 1, h, w): the pipeline unpacks to its VAE's frame axis, which is not the Denoiser's.
        return QwenImagePipeline._unpack_latents(out, h * self.vae_scale, w * self.vae_scale, self.vae_scale)[:, :, 0]

    def features(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """The image tokens after each of `feature_depths` blocks, in that order, (B, depths, tokens,
        width): the transformer's forward (diffusers 0.42, text-to-image: no guidance, ControlNet or
        additional t_cond) up to the deepest one, so the head does not pay for the blocks after it."""
        from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask

        tr, inputs = self.transformer, self.transformer_inputs(x_t, t, cond)
        hidden = tr.img_in(inputs["hidden_states"])
        timestep = inputs["timestep"].to(hidden.dtype)
        context = tr.txt_in(tr.txt_norm(inputs["encoder_hidden_states"]))
        text_len, _, mask = compute_text_seq_len_from_mask(context, inputs["encoder_hidden_states_mask"])
        temb = tr.time_text_embed(timestep, hidden)
        rope = tr.pos_embed(inputs["img_shapes"], max_txt_seq_len=text_len, device=hidden.device)
        after: dict[int, Tensor] = {}
        for depth, block in enumerate(self.blocks[:max(self.feature_depths)], start=1):
            if torch.is_grad_enabled() and tr.gradient_checkpointing:
                context, hidden = tr._gradient_checkpointing_func(block, hidden, context, mask, temb, rope, None, None)
            else:
                context, hidden = block(hidden_states=hidden, encoder_hidden_states=context,
                                        encoder_hidden_states_mask=mask, temb=temb, image_rotary_emb=rope)
            if depth in self.feature_depths:
                after[depth] = hidden
        # In the order of feature_depths: TokenHead's i-th head reads the i-th depth listed.
        return torch.stack([after[d] for d in self.feature_depths], dim=1)


def check_qwen_folder(path: str | os.PathLike) -> str:
    """A local teacher folder holds a Qwen-Image pipeline's parts (a hub id passes through);
    TeacherNotFound names the folder and what it lacks."""
    return check_pipeline_parts(path, FAMILY, COMPONENTS)


def load_qwen_teacher(path_or_hub_id: str | os.PathLike, resolution: int, dtype: torch.dtype = torch.float32,
                      feature_depths: list[int] | None = None) -> QwenImageDenoiser:
    """The frozen teacher of a Qwen-Image pipeline (local folder or hub id) for images of `resolution`
    px (the timestep shift depends on it). Loads the transformer and the scheduler's and VAE's
    configs, and encodes the negative prompt once (CFG's unconditional input) with the text encoder
    in `dtype`, which is dropped afterwards: training reads precomputed embeddings."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    p = check_qwen_folder(path_or_hub_id)
    try:
        transformer = QwenImageTransformer2DModel.from_pretrained(p, subfolder="transformer", dtype=dtype)
        scheduler_config = dict(FlowMatchEulerDiscreteScheduler.load_config(p, subfolder="scheduler"))
        scale = vae_scale_factor(AutoencoderKLQwenImage.load_config(p, subfolder="vae"))
        embeds, mask = QwenPromptEncoder.load(p, dtype=dtype).encode_unpadded([NEGATIVE_PROMPT])
    except (OSError, ValueError) as e:
        raise OSError(f"could not load the {FAMILY} teacher from {p!r}: {e}") from e
    null = fixed_length(embeds.to(dtype), mask, embeds.shape[1])  # its own tokens: one prompt, no padding
    schedule = FlowMatchSchedule(scheduler_config, image_seq_len(resolution, scale))
    model = QwenImageDenoiser(transformer, schedule, null, feature_depths, scale)
    return model.eval().requires_grad_(False)


# -- latents ---------------------------------------------------------------------------------------
def latent_shape(teacher: str | os.PathLike, resolution: int) -> tuple[int, int, int]:
    """(channels, h, w) of the teacher's latents at `resolution`: the VAE's z_dim (16; the
    transformer's 64 input channels are 2x2-packed) and the resolution over its downsampling.
    Reads only the VAE's config file."""
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage.load_config(os.fspath(teacher), subfolder="vae")
    size = resolution // vae_scale_factor(vae)
    return int(vae["z_dim"]), size, size


def _latent_stats(vae, like: Tensor) -> tuple[Tensor, Tensor]:
    """The VAE's per-channel latents_mean and latents_std, shaped (1, C, 1, 1) like `like`."""
    c = vae.config
    mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1).to(like.device, like.dtype)
    std = torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1).to(like.device, like.dtype)
    return mean, std


@torch.no_grad()
def encode_latents(vae, images: Tensor) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> latents (B, 16, H / 8, W / 8): the posterior's mean (a cached
    data set must not freeze one noise draw; Qwen-Image's img2img pipeline also takes the mode), as
    (z - latents_mean) / latents_std per channel, the inverse of what the pipeline applies before
    decoding. One frame on the VAE's time axis."""
    z = vae.encode(images.to(vae.device, vae.dtype).unsqueeze(2)).latent_dist.mean[:, :, 0]
    mean, std = _latent_stats(vae, z)
    return (z - mean) / std


@torch.no_grad()
def decode_latents(vae, latents: Tensor) -> Tensor:
    """`encode_latents`' inverse through the VAE, as QwenImagePipeline decodes: latents * latents_std
    + latents_mean, one frame, the decoder's output in [-1, 1] (B, 3, H, W)."""
    mean, std = _latent_stats(vae, latents)
    z = (latents * std + mean).to(vae.dtype).unsqueeze(2)
    return vae.decode(z, return_dict=False)[0][:, :, 0]


class QwenVaeLatents:
    """images (B, 3, H, W) in [-1, 1] -> normalised latents (`encode_latents`) through a teacher's
    AutoencoderKLQwenImage, loaded once (e.g. in a Ray actor)."""

    def __init__(self, teacher: str | os.PathLike, device: torch.device | str = "cpu"):
        from diffusers import AutoencoderKLQwenImage

        self.vae = AutoencoderKLQwenImage.from_pretrained(os.fspath(teacher), subfolder="vae").to(device).eval()

    def __call__(self, images: Tensor) -> Tensor:
        return encode_latents(self.vae, images).float()
