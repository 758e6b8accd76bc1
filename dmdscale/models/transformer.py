"""What the flow-matching transformer adapters share (sd3, flux, qwenimage): the diffusers
transformer behind `core.networks.Denoiser`, its blocks in forward order, the token width the
discriminator head reads, the blocks it reads them after, and the time embedding a
step-conditioned critic adds to."""
from __future__ import annotations

import torch

from dmdscale.core.networks import Denoiser
from dmdscale.core.schedule import Schedule


class TransformerDenoiser(Denoiser):
    """A diffusers transformer (`transformer`) as a Denoiser; subclasses give `predict`,
    `features` and `null_cond`. `feature_depths` (loss.gan_feature_depths, 1-based blocks;
    default the middle one) are checked against the transformer's blocks here."""

    prediction_type = "flow_prediction"

    def __init__(self, schedule: Schedule, transformer: torch.nn.Module, feature_depths: list[int] | None,
                 vae_scale: int):
        super().__init__(schedule)
        self.transformer, self.vae_scale = transformer, vae_scale
        depth = self.num_blocks
        self.feature_depths = list(feature_depths or [max(1, depth // 2)])  # default: the middle block
        bad = [d for d in self.feature_depths if not 1 <= d <= depth]
        if bad:
            raise ValueError(f"loss.gan_feature_depths: {bad} outside this transformer's blocks 1..{depth}")

    @property
    def blocks(self) -> list[torch.nn.Module]:
        """The transformer blocks in forward order (FLUX: the dual-stream ones, then the single-stream)."""
        return [*self.transformer.transformer_blocks, *getattr(self.transformer, "single_transformer_blocks", [])]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def feature_width(self) -> int:
        """Width of the image tokens the discriminator head reads."""
        return int(self.transformer.inner_dim)

    def time_embedding_layer(self) -> tuple[torch.nn.Module, int]:
        # SD3, FLUX and Qwen-Image: `time_text_embed`'s output is temb, inner_dim wide, which every
        # block's modulation reads.
        return self.transformer.time_text_embed, self.feature_width
