"""Discriminator heads on the fake score's bottleneck features."""
from __future__ import annotations

from torch import nn


class MLPHead(nn.Sequential):
    """For vector features (toy2d): hidden -> hidden -> 1 logit."""

    def __init__(self, in_features: int, hidden: int = 256):
        super().__init__(nn.Linear(in_features, hidden), nn.SiLU(), nn.Linear(hidden, 1))
