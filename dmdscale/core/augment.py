"""Differentiable augmentation of the discriminator's inputs (DiffAugment, Zhao et al. 2020).

Why: on a small data set (~1.4k training digits) the GAN discriminator memorises the real
images and its loss stops teaching the generator anything. DiffAugment applies the same random
transformations to real and generated images before the discriminator, so it sees a larger
variety of inputs; since real and fake go through the same transform T, the discriminator
compares T(p_real) with T(p_fake) and the GAN's optimum (p_fake = p_real) is unchanged. The
transforms are differentiable so the generator's gradient flows back through them.

Each sample gets its own random draw. "flip" (horizontal) is not label-preserving for digits
(a mirrored 2, 3, 7 is not that digit): use ("shift", "cutout") there.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

AUGMENTATIONS = ("flip", "shift", "cutout")

SHIFT_RATIO = 0.125  # DiffAugment's translation: up to 1/8 of the image size
CUTOUT_RATIO = 0.5  # DiffAugment's cutout: a square of half the image size


def augment(x: Tensor, policy: Sequence[str], generator: torch.Generator | None = None) -> Tensor:
    """Apply the augmentations named in `policy`, in order, to a (B, C, H, W) batch.

    Random draws use `generator` (on x's device) when given, so a caller can reproduce them.
    Keeps shape, dtype and device; an empty policy returns `x` itself.
    """
    if isinstance(policy, str):  # a bare "shift" would otherwise be read as "s", "h", ...
        raise TypeError(f"policy must be a sequence of names from {AUGMENTATIONS}, not a string")
    unknown = [name for name in policy if name not in AUGMENTATIONS]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; allowed: {AUGMENTATIONS}")
    for name in policy:
        x = _APPLY[name](x, generator)
    return x


def flip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each sample horizontally with probability 0.5."""
    mirror = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(mirror[:, None, None, None], x.flip(-1), x)


def shift(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Translate each sample by integer offsets in [-s, s] (s = H/8, W/8), zero-filling the gap.

    Zero-pad by s, then read each output pixel from its shifted position in the padded map:
    plain indexing, so the gradient flows back to the moved pixels.
    """
    batch, _, height, width = x.shape
    sy, sx = _shift_range(height), _shift_range(width)
    dy = torch.randint(-sy, sy + 1, (batch,), generator=generator, device=x.device)
    dx = torch.randint(-sx, sx + 1, (batch,), generator=generator, device=x.device)
    # output[y, x] = input[y - dy, x - dx] = padded[y - dy + sy, x - dx + sx]
    rows = torch.arange(height, device=x.device)[None, :] - dy[:, None] + sy  # (B, H)
    cols = torch.arange(width, device=x.device)[None, :] - dx[:, None] + sx  # (B, W)
    padded = F.pad(x, (sx, sx, sy, sy)).permute(0, 2, 3, 1)  # (B, H + 2sy, W + 2sx, C)
    samples = torch.arange(batch, device=x.device)[:, None, None]
    return padded[samples, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def cutout(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Zero a (H/2, W/2) rectangle (a square for square images) at a random place per sample.

    Unlike DiffAugment, the rectangle stays fully inside the image, so every sample loses the
    same area.
    """
    batch, _, height, width = x.shape
    inside_y = _random_window(batch, height, generator, x.device)  # (B, H)
    inside_x = _random_window(batch, width, generator, x.device)  # (B, W)
    keep = ~(inside_y[:, :, None] & inside_x[:, None, :])
    return x * keep[:, None].to(x.dtype)


def _shift_range(size: int) -> int:
    return max(1, round(size * SHIFT_RATIO))


def _random_window(batch: int, size: int, generator: torch.Generator | None, device) -> Tensor:
    """Per sample, a boolean mask over `size` positions that is True on a window of size/2."""
    length = max(1, round(size * CUTOUT_RATIO))
    start = torch.randint(0, size - length + 1, (batch, 1), generator=generator, device=device)
    positions = torch.arange(size, device=device)[None, :]
    return (positions >= start) & (positions < start + length)


_APPLY = {"flip": flip, "shift": shift, "cutout": cutout}
