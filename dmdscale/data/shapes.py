"""Coloured shapes: a small RGB data set whose colour is free of its label.

The label (0 circle, 1 square, 2 triangle) is the shape; position, size and colour are drawn
freely. A classifier trained on the labels learns to ignore colour, so this set shows what
label-trained FID features miss (a colour collapse) and what the label-free metrics of
`dmdscale.eval.diversity` catch (tests, bench/eval_metrics.py).
"""
from __future__ import annotations

import colorsys

import numpy as np


def colored_shapes(n: int, seed: int, hue_bands: tuple[float, ...] | None = None,
                   resolution: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """n RGB shapes on black (uint8 NHWC) and their labels. The colour is drawn in HSV: hue
    free, or within 0.05 of `hue_bands[label]` (a class-preserving mode drop)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    yy, xx = np.mgrid[0:resolution, 0:resolution] + 0.5
    images = np.zeros((n, resolution, resolution, 3), np.uint8)
    for image, label in zip(images, labels):
        size = rng.uniform(0.3, 0.6) * resolution
        cx, cy = rng.uniform(size / 2, resolution - size / 2, 2)
        if label == 0:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= (size / 2) ** 2
        elif label == 1:
            mask = (abs(xx - cx) <= size / 2) & (abs(yy - cy) <= size / 2)
        else:
            top = cy - size / 2
            mask = (yy >= top) & (yy <= cy + size / 2) & (abs(xx - cx) <= (yy - top) / 2)
        hue = rng.uniform() if hue_bands is None else hue_bands[label] + rng.uniform(0, 0.05)
        rgb = colorsys.hsv_to_rgb(hue % 1, rng.uniform(0.5, 1), rng.uniform(0.6, 1))
        image[mask] = np.round(np.array(rgb) * 255).astype(np.uint8)
    return images, labels
