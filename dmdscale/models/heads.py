"""Discriminator heads on the fake score's bottleneck features."""
from __future__ import annotations

from torch import Tensor, nn

from dmdscale.models.base import Denoiser


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
    def for_model(cls, model: Denoiser, hidden: int | None = None) -> "ConvHead":
        """A head sized to the model's bottleneck (its last `block_out_channels`)."""
        return cls(model.feature_channels, hidden)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)
