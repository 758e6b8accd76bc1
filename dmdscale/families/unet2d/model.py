"""unet2d: pixel-space class-conditional diffusers UNet2DModel as a dmdscale Denoiser.

The class embedding has `num_classes + 1` rows; the last row is the null class, the
unconditional input for classifier-free guidance (the teacher is trained with label dropout
to it). The GAN head reads the mid-block output, the bottleneck DMD2's discriminator uses.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import Tensor

from dmdscale.core.schedule import NoiseSchedule
from dmdscale.core.networks import Cond, Denoiser
from dmdscale.models.hub import is_local
from dmdscale.models.heads import group_count


class ClassConditionalUNet(Denoiser):
    """x0 = model(x_t, t, labels, guidance_scale) over a diffusers `UNet2DModel`.

    `prediction_type` is read from the scheduler config per instance, so an eps-, v- or
    x0-predicting teacher all plug in without code changes. A UNet without a class embedding
    is accepted too (cond must then be None, and CFG is a no-op).
    """

    def __init__(self, unet: UNet2DModel, schedule: NoiseSchedule):
        super().__init__(schedule)
        self.unet = unet
        self.prediction_type = str(schedule.scheduler_config.get("prediction_type", "epsilon"))
        n = unet.config.num_class_embeds
        self.num_classes = int(n) - 1 if n is not None else 0

    @classmethod
    def from_config(cls, unet_config: dict[str, Any], scheduler_config: dict[str, Any]) -> "ClassConditionalUNet":
        """A freshly initialised model, e.g. for tests or training from scratch."""
        return cls(UNet2DModel.from_config(unet_config), NoiseSchedule(scheduler_config))

    @property
    def null_class(self) -> int:
        """Index of the unconditional class embedding (the last row)."""
        return self.num_classes

    @property
    def feature_channels(self) -> int:
        """Channels of `features` (the bottleneck), for sizing the discriminator head."""
        return int(self.unet.config.block_out_channels[-1])

    def null_cond(self, cond: Cond) -> Cond:
        if cond is None or self.num_classes == 0:
            return None
        return torch.full_like(cond, self.null_class)

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        return self.unet(x_t, t, class_labels=cond).sample

    def time_embedding_layer(self) -> tuple[torch.nn.Module, int]:
        return self.unet.time_embedding, int(self.unet.time_embedding.linear_2.out_features)

    def features(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """The mid-block output (B, C, h, w): the first half of `UNet2DModel.forward`, mirrored
        step by step (diffusers 0.42) so the head sees exactly what a full forward computes
        without paying for the decoder."""
        unet = self.unet
        sample = x_t
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        # 1. time (+ class) embedding
        timesteps = t
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], dtype=torch.long, device=sample.device)
        elif timesteps.ndim == 0:
            timesteps = timesteps[None].to(sample.device)
        timesteps = timesteps * torch.ones(sample.shape[0], dtype=timesteps.dtype, device=timesteps.device)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
        if unet.class_embedding is not None:
            if cond is None:
                raise ValueError("class_labels should be provided when doing class conditioning")
            labels = cond
            if unet.config.class_embed_type == "timestep":
                labels = unet.time_proj(labels)
            emb = emb + unet.class_embedding(labels).to(dtype=unet.dtype)
        elif cond is not None:
            raise ValueError("class_embedding needs to be initialized in order to use class conditioning")
        # 2. pre-process, 3. down (skip connections are discarded: the decoder is not run)
        skip_sample = sample
        sample = unet.conv_in(sample)
        for block in unet.down_blocks:
            if hasattr(block, "skip_conv"):
                sample, _, skip_sample = block(hidden_states=sample, temb=emb, skip_sample=skip_sample)
            else:
                sample, _ = block(hidden_states=sample, temb=emb)
        # 4. mid
        if unet.mid_block is not None:
            sample = unet.mid_block(sample, emb)
        return sample


def tiny_unet_config(resolution: int = 16, channels: int = 1, num_classes: int = 10,
                     width: int = 32) -> dict[str, Any]:
    """A small class-conditional UNet2DModel config for low-resolution digits on CPU.

    Three levels (width, 2w, 2w) at resolution, /2, /4, one resnet per level, self-attention
    at /2 and in the mid block (4x4 for 16x16 inputs); the bottleneck has 2*width channels.
    """
    if resolution % 4:
        raise ValueError(f"resolution must be divisible by 4 (two downsamplings), got {resolution}")
    widths = (width, 2 * width, 2 * width)
    return {
        "sample_size": resolution,
        "in_channels": channels,
        "out_channels": channels,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": widths,
        "layers_per_block": 1,
        "attention_head_dim": width,
        "norm_num_groups": group_count(width, 8),
        "num_class_embeds": num_classes + 1,  # + the null class for CFG
    }


def check_unet_folder(path_or_hub_id: str | os.PathLike) -> str:
    """A local teacher folder must hold unet/ and scheduler/ (TeacherNotFound naming what is
    missing); a hub id passes through. Returns the path to load from."""
    from dmdscale.errors import TeacherNotFound

    p = os.fspath(path_or_hub_id)
    if not is_local(p):
        return p
    root = Path(p).expanduser()
    missing = [sub for sub, f in (("unet", "config.json"), ("scheduler", "scheduler_config.json"))
               if not (root / sub / f).is_file()]
    if missing:
        raise TeacherNotFound(
            f"teacher folder {str(root)!r} is not a diffusers UNet teacher: missing "
            + ", ".join(f"{m}/" for m in missing)
            + " (expected unet/config.json with weights and scheduler/scheduler_config.json)")
    return str(root)


def load_unet(path_or_hub_id: str | os.PathLike) -> ClassConditionalUNet:
    """A class-conditional UNet from a diffusers folder (local, or a hub id) with `unet/` and
    `scheduler/`: a user's own teacher, the cached one `load_or_train_teacher` makes, or an
    exported student (same layout). Returned in eval mode with gradients off.
    """
    p = check_unet_folder(path_or_hub_id)
    try:
        unet = UNet2DModel.from_pretrained(p, subfolder="unet")
        scheduler = DDPMScheduler.from_pretrained(p, subfolder="scheduler")
    except (OSError, ValueError) as e:
        raise OSError(f"could not load the UNet teacher from {p!r}: {e}") from e
    model = ClassConditionalUNet(unet, NoiseSchedule(dict(scheduler.config)))
    return model.eval().requires_grad_(False)
