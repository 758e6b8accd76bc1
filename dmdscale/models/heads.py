"""Discriminator heads on the fake score's bottleneck features."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdscale.core.networks import Denoiser


class MLPHead(nn.Sequential):
    """For vector features (toy2d): hidden -> hidden -> 1 logit."""

    def __init__(self, in_features: int, hidden: int = 256):
        super().__init__(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, 1))


def group_count(channels: int, max_groups: int = 32) -> int:
    """Largest GroupNorm group count <= max_groups that divides `channels`."""
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class ConvHead(nn.Module):
    """DMD2 discriminator head on the (B, C, h, w) bottleneck: a logit map, averaged by Critic.

    Conv 3x3 stride 2 -> GroupNorm -> SiLU -> Conv 1x1 to one channel. Small on purpose: the
    fake score's trunk does the feature work and is trained together with the head.
    """

    def __init__(self, in_channels: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or in_channels
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, kernel_size=3, stride=2, padding=1),
            nn.GroupNorm(group_count(hidden), hidden),
            nn.SiLU(),
            nn.Conv2d(hidden, 1, kernel_size=1),
        )

    @classmethod
    def for_model(cls, model: Denoiser, hidden: int | None = None) -> ConvHead:
        """A head sized to the model's bottleneck (its last `block_out_channels`)."""
        return cls(model.feature_channels, hidden)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


class FullHead(nn.Module):
    """The DMD2 authors' discriminator head, full width: two Conv 4x4 stride 2 (each followed by
    GroupNorm + SiLU) keeping the input's channel count, then Conv 1x1 to one logit channel.

    Larger than ConvHead (two 4x4 convs at full width instead of one 3x3); its logit map is
    averaged by Critic, so a 1x1 or 2x2 map is fine.
    """

    # Each 4x4/2 conv with padding 1 maps size n to n // 2, so two of them need n >= 4.
    MIN_SIZE = 4

    def __init__(self, in_channels: int):
        super().__init__()

        # At least 16 channels per group: the last conv's map can be 1x1 (a 4x4 bottleneck), where
        # GroupNorm's usual 32 groups of 64 channels normalise pairs of values to +-1 and leave
        # nothing to discriminate on (measured: such a head stayed at P(real) = 0.5).
        groups = group_count(in_channels, max(1, min(32, in_channels // 16)))

        def down() -> list[nn.Module]:
            return [
                nn.Conv2d(in_channels, in_channels, kernel_size=4, stride=2, padding=1),
                nn.GroupNorm(groups, in_channels),
                nn.SiLU(),
            ]

        self.net = nn.Sequential(*down(), *down(), nn.Conv2d(in_channels, 1, kernel_size=1))

    @classmethod
    def for_model(cls, model: Denoiser) -> FullHead:
        """A head as wide as the model's bottleneck (its last `block_out_channels`)."""
        return cls(model.feature_channels)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(self._pad_to_min_size(features))

    def _pad_to_min_size(self, features: Tensor) -> Tensor:
        """Zero-pad maps smaller than 4x4 (e.g. a 2x2 bottleneck) so the output is >= 1x1.

        Zero padding is what the convs' own padding does anyway, adds no parameters, keeps
        every input value and leaves maps of 4x4 and up untouched (unlike pooling/resizing).
        """
        pad_h = max(0, self.MIN_SIZE - features.shape[-2])
        pad_w = max(0, self.MIN_SIZE - features.shape[-1])
        if not (pad_h or pad_w):
            return features
        return F.pad(features, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


# Config names of the discriminator heads on a UNet bottleneck.
HEADS = {"conv": ConvHead, "full": FullHead}


class TokenHead(nn.Module):
    """Discriminator head on a transformer's hidden states at one or more depths (flow families).

    Input (B, depths, tokens, width): the image tokens after each chosen block. Each depth has its
    own LayerNorm -> Linear -> SiLU -> Linear to one logit per token (features at several depths:
    NVIDIA FastGen's tip for transformer teachers); Critic averages every token's logit. Per-token
    rather than a conv on the patch grid: no spatial layout to assume, and its width stays
    independent of how many depths are read.
    """

    def __init__(self, width: int, num_depths: int = 1, hidden: int | None = None):
        super().__init__()
        hidden = hidden or width
        self.per_depth = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, 1))
            for _ in range(num_depths))

    @classmethod
    def for_model(cls, model: Denoiser) -> TokenHead:
        """A head for the model's `feature_width` and `feature_depths`."""
        return cls(model.feature_width, len(model.feature_depths))

    def forward(self, features: Tensor) -> Tensor:
        if features.shape[1] != len(self.per_depth):
            raise ValueError(f"TokenHead has {len(self.per_depth)} depths, features hold {features.shape[1]}")
        return torch.stack([head(features[:, i]) for i, head in enumerate(self.per_depth)], dim=1)
