"""The one conversion between stored images (uint8 N x H x W x C) and model space
(float32 N x C x H x W in [-1, 1]), used by data loading, teacher training, evaluation and export."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_model_space(images_uint8_nhwc: Any) -> torch.Tensor:
    """uint8 N x H x W x C (numpy or torch) -> float32 N x C x H x W in [-1, 1]."""
    x = images_uint8_nhwc.detach().cpu() if torch.is_tensor(images_uint8_nhwc) \
        else torch.from_numpy(np.ascontiguousarray(images_uint8_nhwc))
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"expected uint8 N x H x W x C images, got {x.dtype} with shape {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Model space N x C x H x W (clipped to [-1, 1]) -> uint8 N x H x W x C."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
