"""The pictures people look at: labelled sample grids and training curves (matplotlib, Agg)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

Curve = tuple[Sequence[int], Sequence[float]]  # (steps, values)


def _save(fig, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first `per_class` images of each label present, class by class: the
    images a grid shows."""
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])


def save_grid(images_uint8_nhwc: np.ndarray, labels_or_None: np.ndarray | None,
              path: str | os.PathLike, ncols: int = 10, title: str | None = None,
              scale: float = 0.8) -> Path:
    """Save a grid of samples, each enlarged (nearest neighbour, `scale` inches per cell) and
    captioned with its label, so a glance tells whether each digit matches its class."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(images_uint8_nhwc)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    extra = 0.4 if title else 0.0
    fig = Figure(figsize=(ncols * scale, nrows * scale * 1.2 + extra), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i >= n:
            continue
        img = images_uint8_nhwc[i]
        gray = img.shape[-1] == 1
        ax.imshow(img[..., 0] if gray else img, cmap="gray" if gray else None,
                  vmin=0, vmax=255, interpolation="nearest")
        if labels_or_None is not None:
            ax.set_title(str(int(labels_or_None[i])), fontsize=9, pad=2)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def curves_from_log(records: Sequence[dict], prefix: str) -> dict[str, Curve]:
    """(steps, values) by step of every numeric key starting with `prefix` in records that
    carry a "step" (a run folder's train_log.json, checkpoint_evaluations.json)."""
    records = sorted((r for r in records if "step" in r), key=lambda r: r["step"])
    names = sorted({k for r in records for k in r if k.startswith(prefix)})
    curves = {}
    for name in names:
        points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
        curves[name] = ([s for s, _ in points], [v for _, v in points])
    return curves


def plot_curves(curves: dict[str, Curve], path: str | os.PathLike) -> Path:
    """One panel per named curve against the step (e.g. each loss, or FID over training)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = sorted(curves)
    fig = Figure(figsize=(3.2 * max(len(names), 1), 3), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, max(len(names), 1), squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        steps, values = curves[name]
        ax.plot(steps, values, lw=0.8)
        positive = [v for v in values if v > 0]
        if positive and max(positive) > 100 * min(positive):  # e.g. the DM loss's rare spikes
            ax.set_yscale("symlog", linthresh=max(min(positive), 1e-4 * max(positive)))
        ax.set_title(name)
        ax.set_xlabel("step")
    return _save(fig, path)


def plot_overlay(curves: dict[str, Curve], path: str | os.PathLike, ylabel: str, title: str | None = None) -> Path:
    """Named curves on one axis with a legend (e.g. every sweep trial's FID against step)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name in sorted(curves):
        steps, values = curves[name]
        ax.plot(steps, values, marker="o", ms=3, lw=1, label=name)
    positive = [v for _, values in curves.values() for v in values if v > 0]
    if positive and max(positive) > 20 * min(positive):  # a diverged trial would flatten the rest
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if curves:
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_panels(panels: dict[str, dict[str, Curve]], path: str | os.PathLike) -> Path:
    """One panel per group, its named curves overlaid with a legend (e.g. a figure by noise level)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    titles = [t for t in panels if panels[t]]
    fig = Figure(figsize=(4.2 * max(len(titles), 1), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, max(len(titles), 1), squeeze=False)).ravel()
    for ax, title in zip(axes, titles):
        for name, (steps, values) in sorted(panels[title].items()):
            ax.plot(steps, values, lw=0.9, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


# The DMD2 step's diagnostics (dmdscale.core.step): panel title -> metric prefix.
DIAGNOSTIC_PANELS = {
    "|x0 teacher - x0 fake score|, by sigma": "diag_x0_gap_",
    "discriminator P(real) on real, by sigma": "diag_d_real_",
    "discriminator P(real) on generated, by sigma": "diag_d_fake_",
    "gradient norms at the generator's output": "grad_norm_",
}


def plot_diagnostics(log: Sequence[dict], path: str | os.PathLike) -> Path | None:
    """diagnostics.png from a run's log; None when the log holds no diagnostics (e.g. no GAN
    and an old log). The gradient panel shows the DM and (weighted) GAN terms' norms at x."""
    panels = {}
    for title, prefix in DIAGNOSTIC_PANELS.items():
        curves = curves_from_log(log, prefix)
        if prefix == "grad_norm_":
            curves = {k: v for k, v in curves.items() if k.endswith("_x")}
        panels[title] = {name.removeprefix(prefix): curve for name, curve in curves.items() if curve[0]}
    if not any(panels.values()):
        return None
    return plot_panels(panels, path)
