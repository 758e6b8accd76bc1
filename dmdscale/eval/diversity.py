"""Sample-quality metrics that see what a person sees: colour, texture and variety.

FID on a label-trained classifier's features (`metrics.compute_fid`) sees the labels and
little else: a student whose colours collapsed to grey but draws the right shapes can score a
better classifier-FID than its teacher. The metrics here catch what such features miss:

- `precision_recall` and `density_coverage`: fidelity (are samples on the data's manifold?)
  and variety (is all of the data's manifold reached?) from k-nearest-neighbour balls in a
  feature space, so a collapse of variety shows as low recall or coverage instead of being
  blended into one FID figure.
- `sliced_wasserstein`: a label-free distance between the distributions of 7x7 patches of
  the two sets' Laplacian pyramids (SWD). No network and no downloaded weights, so it cannot
  be blind to what a network learnt to ignore. It was chosen over the Frechet distance on the
  features of an autoencoder trained without labels on the reference images: on constructed
  defects it separated every defect from the real-vs-real floor better in the worst case, and
  needs no training (bench/eval_metrics.py, bench/results/eval_metrics.json).
- `image_statistics` and `statistics_gap`: channel means and spreads, colourfulness and
  saturation, figures a person can check against the pictures.

They take uint8 N x H x W x C images (C = 1 or 3) or (N, D) feature arrays, are plain numpy
and torch, and are deterministic given `seed`. `sample_quality` runs them all.

Naming: every key `sample_quality` returns is `<quantity>_<space>`, the part after the last
underscore naming the feature space it was computed in, so numbers from different spaces are
never compared by accident (`recall_pixels` is not `recall_classifier`):

- `pixels`: the images themselves, no network: SWD, the colour statistics, and the k-NN
  metrics on `pixel_features` (pixels in [0, 1], averaged down to at most 16 px a side).
- any other name: a feature network the caller passes as `features_fn` and names with
  `feature_space`, e.g. `classifier` for dmdscale's label-trained digit classifier.

Quantities:

- `precision`, `recall` (k = 3), `coverage` (k = 5): 0..1, higher is better. `density`
  (k = 5): about 1 when samples spread like the data, above 1 when they crowd into its
  densest regions, below when they stray.
- `swd` (the mean over pyramid levels) and `swd<resolution>` per level, e.g. `swd16`, `swd8`:
  lower is better, 0 for identical sets; multiplied by 1e3 as in ProGAN.
- The samples' statistics (`channel_mean_<c>`, `channel_std_<c>`, `mean_color_spread` in
  0..255 units, `colorfulness`, `saturation_bright` in percent) and their gap to the
  reference's: `<statistic>_ratio` (samples / reference, 1 is ideal; left out where the
  reference has none of it) for spreads and colour,
  `channel_mean_gap_<c>` (samples - reference in 0..255, 0 is ideal).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "precision_recall",
    "density_coverage",
    "pyramid_resolutions",
    "sliced_wasserstein",
    "image_statistics",
    "statistics_gap",
    "pixel_features",
    "sample_quality",
]

FeaturesFn = Callable[[np.ndarray], np.ndarray]

# HSV value (max channel, 0..1) from which a pixel counts as bright: the saturation of darker
# pixels is dominated by quantisation noise ((max - min) / max with a small max).
BRIGHT_VALUE = 0.25


# --- k-nearest-neighbour manifolds --------------------------------------------------------


def _as_features(features: np.ndarray | Tensor) -> Tensor:
    """(N, D) float64: double precision keeps cdist's matrix-product shortcut exact enough
    that a point's distance to itself is ~0, not rounding noise larger than a tight radius."""
    x = torch.as_tensor(features, dtype=torch.float64).detach().cpu()
    if x.ndim != 2:
        raise ValueError(f"expected (N, D) features, got shape {tuple(x.shape)}")
    return x


def _chunked_distances(a: Tensor, b: Tensor, chunk: int = 1024) -> Iterator[tuple[slice, Tensor]]:
    """Yield (row slice, Euclidean distances from those rows of a to all of b), so that only
    chunk x len(b) distances exist at once."""
    for start in range(0, len(a), chunk):
        rows = slice(start, start + chunk)
        yield rows, torch.cdist(a[rows], b)


def _kth_neighbour_distance(x: Tensor, k: int) -> Tensor:
    """Distance from each row of x to its k-th nearest other row: the radius of its ball."""
    if len(x) <= k:
        raise ValueError(f"need more than k={k} points, got {len(x)}")
    radii = torch.empty(len(x), dtype=x.dtype)
    for rows, d in _chunked_distances(x, x):
        radii[rows] = d.topk(k + 1, dim=1, largest=False).values[:, -1]  # +1: the point itself
    return radii


def _balls_containing(points: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """For each point, how many of the balls (centres, radii) contain it."""
    counts = torch.empty(len(points), dtype=torch.long)
    for rows, d in _chunked_distances(points, centres):
        counts[rows] = (d <= radii).sum(dim=1)
    return counts


def precision_recall(real_features: np.ndarray | Tensor, fake_features: np.ndarray | Tensor,
                     k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): {"precision", "recall"}.

    Each set's manifold is the union of balls around its points reaching their k-th nearest
    neighbour. Precision is the share of samples inside the real manifold (fidelity), recall
    the share of real points inside the samples' manifold (variety): a generator that draws a
    few good images over and over keeps precision and loses recall.
    """
    real, fake = _as_features(real_features), _as_features(fake_features)
    real_radii, fake_radii = _kth_neighbour_distance(real, k), _kth_neighbour_distance(fake, k)
    return {"precision": float((_balls_containing(fake, real, real_radii) > 0).double().mean()),
            "recall": float((_balls_containing(real, fake, fake_radii) > 0).double().mean())}


def density_coverage(real_features: np.ndarray | Tensor, fake_features: np.ndarray | Tensor,
                     k: int = 5) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020): {"density", "coverage"}.

    Both use only the real set's k-NN balls, so unlike recall they are not inflated by a few
    outlying samples whose large balls swallow the data. Density is the mean number of real
    balls containing a sample, divided by k (about 1 when the sets match). Coverage is the
    share of real points whose ball holds at least one sample: the modes the generator reaches.
    """
    real, fake = _as_features(real_features), _as_features(fake_features)
    radii = _kth_neighbour_distance(real, k)
    density = _balls_containing(fake, real, radii).double().sum() / (k * len(fake))
    covered = torch.empty(len(real), dtype=torch.bool)
    for rows, d in _chunked_distances(real, fake):
        covered[rows] = d.min(dim=1).values <= radii[rows]
    return {"density": float(density), "coverage": float(covered.double().mean())}


# --- multi-scale sliced Wasserstein distance ----------------------------------------------


def _check_images(images: np.ndarray) -> np.ndarray:
    """The uint8 N x H x W x C array (C = 1 or 3) every image function here takes."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected uint8 N x H x W x C images with C = 1 or 3, got "
                         f"{images.dtype} with shape {images.shape}")
    return images


def pyramid_resolutions(resolution: int, patch_size: int = 7, min_resolution: int = 8) -> list[int]:
    """Side lengths of the Laplacian pyramid's levels, finest first: halve while the next level
    still holds a patch and at least `min_resolution` pixels, so 16 px gives [16, 8], 64 px
    [64, 32, 16, 8] and 8 px the single level [8]. Coarser levels would hold too few patch
    positions (a 4 px level has none for 7x7 patches) to compare distributions."""
    smallest = max(patch_size, min_resolution)
    if resolution < smallest:
        raise ValueError(f"images of {resolution} px are smaller than {smallest} px")
    sizes = [resolution]
    while (sizes[-1] + 1) // 2 >= smallest:
        sizes.append((sizes[-1] + 1) // 2)
    return sizes


_BINOMIAL_5 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


def _blur(x: Tensor, stride: int = 1) -> Tensor:
    """5x5 binomial (Gaussian) filter per channel with mirrored borders, as ProGAN's pyramid."""
    c = x.shape[1]
    kernel = (_BINOMIAL_5[:, None] * _BINOMIAL_5[None, :]).to(x.dtype).expand(c, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, stride=stride, groups=c)


def _upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Double the resolution by zero insertion and blurring (x4 for the inserted zeros), then
    crop to `size`: the expansion step of a Laplacian pyramid."""
    n, c, h, w = x.shape
    up = torch.zeros(n, c, 2 * h, 2 * w, dtype=x.dtype)
    up[:, :, ::2, ::2] = 4 * x
    return _blur(up)[:, :, :size[0], :size[1]]


def _laplacian_pyramid(x: Tensor, levels: int) -> list[Tensor]:
    """Band-pass levels (each minus the expansion of the next coarser one), finest first, and
    the coarsest Gaussian level last, which keeps the low frequencies: colour and layout."""
    gaussians = [x]
    for _ in range(levels - 1):
        gaussians.append(_blur(gaussians[-1], stride=2))
    bands = [fine - _upsample(coarse, fine.shape[-2:]) for fine, coarse in pairwise(gaussians)]
    return bands + [gaussians[-1]]


def _patches(level: Tensor, patch_size: int, count: int, seed: int) -> Tensor:
    """(count, C * patch_size**2) patch descriptors, channel-major: every patch of the level
    when it holds exactly `count`, else `count` drawn at random over images and positions.
    The draw depends only on `seed` and the level's shape, so two sets of equal size are
    sampled at the same places: identical sets give exactly 0."""
    n, _, h, w = level.shape
    rows, cols = h - patch_size + 1, w - patch_size + 1
    total = n * rows * cols
    if total == count:
        index = torch.arange(total)
    else:
        index = torch.randint(total, (count,), generator=torch.Generator().manual_seed(seed))
    image, position = index // (rows * cols), index % (rows * cols)
    offsets = torch.arange(patch_size)
    ys = (position // cols)[:, None, None] + offsets[None, :, None]  # (count, k, 1)
    xs = (position % cols)[:, None, None] + offsets[None, None, :]  # (count, 1, k)
    patches = level.permute(0, 2, 3, 1)[image[:, None, None], ys, xs]  # (count, k, k, C)
    return patches.permute(0, 3, 1, 2).reshape(count, -1)


def _sliced_distance(a: Tensor, b: Tensor, projections: int, generator: torch.Generator,
                     batch: int = 128) -> float:
    """Mean over random unit directions of the 1-D Wasserstein-1 distance between the two
    equally large sets projected on them: the mean gap between their sorted projections."""
    total = 0.0
    for start in range(0, projections, batch):
        directions = torch.randn(min(batch, projections - start), a.shape[1], generator=generator)
        directions /= directions.norm(dim=1, keepdim=True)
        # (directions, points): sorting contiguous rows is about twice as fast as columns.
        gap = (directions @ a.T).sort(dim=1).values - (directions @ b.T).sort(dim=1).values
        total += float(gap.abs().mean(dim=1).sum())
    return total / projections


def sliced_wasserstein(real_uint8: np.ndarray, fake_uint8: np.ndarray, seed: int = 0,
                       patch_size: int = 7, max_patches: int = 2**14,
                       projections: int = 256) -> dict[str, float]:
    """Multi-scale sliced Wasserstein distance (SWD, Karras et al. 2018, ProGAN) x 1e3:
    {"swd<resolution>" per level, finest first, and "swd", their mean}.

    Both image sets become Laplacian pyramids; `pyramid_resolutions` chooses the depth so the
    coarsest level is at least 8 px (16 px images: levels 16 and 8). At each level, up to
    `max_patches` 7x7 patches per set are normalised per channel by the mean and std of the
    reference's patches, and the two patch distributions are compared by the mean 1-D
    Wasserstein distance along `projections` random directions. Fine levels see edges and
    texture, the coarsest level colour and layout.

    ProGAN normalises each set by its own statistics; both use the reference's here, so that
    a global loss of contrast or colour counts instead of being normalised away.
    """
    real, fake = _check_images(real_uint8), _check_images(fake_uint8)
    if real.shape[1:] != fake.shape[1:] or real.shape[1] != real.shape[2]:
        raise ValueError(f"need square images of one shape, got {real.shape[1:]} and "
                         f"{fake.shape[1:]}")
    resolutions = pyramid_resolutions(real.shape[1], patch_size)
    levels = [_laplacian_pyramid(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255,
                                 len(resolutions)) for x in (real, fake)]
    directions = torch.Generator().manual_seed(seed)
    result = {}
    for resolution, real_level, fake_level in zip(resolutions, *levels):
        positions = (resolution - patch_size + 1) ** 2
        count = min(max_patches, len(real) * positions, len(fake) * positions)
        real_patches = _patches(real_level, patch_size, count, seed)
        fake_patches = _patches(fake_level, patch_size, count, seed)
        per_channel = real_patches.reshape(count, real_level.shape[1], -1)
        mean = per_channel.mean(dim=(0, 2)).repeat_interleave(patch_size**2)
        std = per_channel.std(dim=(0, 2)).repeat_interleave(patch_size**2).clamp_min(1e-8)
        distance = _sliced_distance((real_patches - mean) / std, (fake_patches - mean) / std,
                                    projections, directions)
        result[f"swd{resolution}"] = 1e3 * distance
    result["swd"] = float(np.mean(list(result.values())))
    return result


# --- image statistics ---------------------------------------------------------------------


def image_statistics(images_uint8: np.ndarray) -> dict[str, float]:
    """Colour figures a person can check against the pictures, 0..255 scale unless stated.

    - `channel_mean_<c>`, `channel_std_<c>`: over all pixels of all images; a grey-washed
      sample set has the right means and a much smaller std.
    - `colorfulness`: Hasler and Suesstrunk (2003), sqrt(std_rg^2 + std_yb^2) + 0.3 *
      sqrt(mean_rg^2 + mean_yb^2) on the opponent channels rg = R - G, yb = (R + G) / 2 - B,
      per image, averaged; 0 for grayscale. About 15 reads "slightly", 60 "quite" colourful.
    - `saturation_bright`: mean HSV saturation in percent (0..100) of the bright pixels (HSV
      value >= 25%), where saturation is well defined; 0 for grayscale.
    - `mean_color_spread`: std across images of each image's mean colour, root mean square
      over channels: how much the overall colour varies from sample to sample.
    """
    images = _check_images(images_uint8)
    x = images.astype(np.float64)
    stats: dict[str, float] = {}
    for c in range(x.shape[-1]):
        stats[f"channel_mean_{c}"] = float(x[..., c].mean())
        stats[f"channel_std_{c}"] = float(x[..., c].std())
    if x.shape[-1] == 3:
        r, g, b = x[..., 0], x[..., 1], x[..., 2]
        rg, yb = r - g, (r + g) / 2 - b
        colorfulness = (np.sqrt(rg.std(axis=(1, 2)) ** 2 + yb.std(axis=(1, 2)) ** 2)
                        + 0.3 * np.sqrt(rg.mean(axis=(1, 2)) ** 2 + yb.mean(axis=(1, 2)) ** 2))
        value, lowest = x.max(axis=-1), x.min(axis=-1)
        bright = value >= BRIGHT_VALUE * 255
        saturation = (value - lowest)[bright] / value[bright]
        stats["colorfulness"] = float(colorfulness.mean())
        stats["saturation_bright"] = float(100 * saturation.mean()) if bright.any() else 0.0
    else:
        stats["colorfulness"] = stats["saturation_bright"] = 0.0
    per_image_mean = x.mean(axis=(1, 2))  # (N, C)
    stats["mean_color_spread"] = float(np.sqrt(per_image_mean.var(axis=0).mean()))
    return stats


def statistics_gap(real_uint8: np.ndarray, fake_uint8: np.ndarray) -> dict[str, float]:
    """How the samples' `image_statistics` differ from the reference's, the gaps that matter:

    - `<statistic>_ratio` (samples / reference, 1 is ideal) for `channel_std_<c>`,
      `mean_color_spread` and, for colour images, `colorfulness` and `saturation_bright`:
      collapse of contrast, variety or colour is multiplicative, so a ratio reads the same on
      any data set (0.3 means 70% of it is gone). A ratio is left out where the reference has
      none of the quantity (grey images in RGB have no colourfulness): metrics.json holds no NaN.
    - `channel_mean_gap_<c>` (samples - reference, 0..255): a colour cast or brightness shift.
    """
    channels = _check_images(real_uint8).shape[-1]
    if _check_images(fake_uint8).shape[-1] != channels:
        raise ValueError("the samples and the reference images have different channel counts")
    real, fake = image_statistics(real_uint8), image_statistics(fake_uint8)
    gap = {f"channel_mean_gap_{c}": fake[f"channel_mean_{c}"] - real[f"channel_mean_{c}"] for c in range(channels)}
    ratios = [f"channel_std_{c}" for c in range(channels)] + ["mean_color_spread"]
    ratios += ["colorfulness", "saturation_bright"] if channels == 3 else []
    gap |= {f"{name}_ratio": fake[name] / real[name] for name in ratios if real[name] > 0}
    return gap


# --- the entry point ----------------------------------------------------------------------


def pixel_features(images_uint8: np.ndarray, max_resolution: int = 16) -> np.ndarray:
    """(N, C * r * r) features that are the pixels themselves, in [0, 1], area-averaged down to
    r = min(resolution, max_resolution): the label-free space for the k-NN metrics. Small
    images need no learned embedding to compare by nearest neighbours, and averaging larger
    ones down keeps the distances on shapes and colours rather than on exact edge placement
    (and keeps the dimension, hence the cost, bounded)."""
    images = _check_images(images_uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255
    x = F.adaptive_avg_pool2d(x, min(images.shape[1], max_resolution))
    return x.reshape(len(x), -1).numpy()


def sample_quality(real_uint8: np.ndarray, fake_uint8: np.ndarray,
                   features_fn: FeaturesFn | None = None, feature_space: str | None = None,
                   seed: int = 0) -> dict[str, float]:
    """Every metric of this module for samples against reference images, as flat floats named
    `<quantity>_<space>` (see the module docstring). Always in `pixels`: SWD, precision,
    recall, density and coverage on `pixel_features`, the samples' colour statistics and their
    gap to the reference's. In `feature_space` too, when given with its `features_fn` (uint8
    N x H x W x C -> (N, D) array): precision, recall, density and coverage."""
    if (features_fn is None) != (feature_space is None):
        raise ValueError("give features_fn and feature_space together")
    if feature_space is not None and (feature_space == "pixels"
                                      or not re.fullmatch(r"[a-z0-9]+", feature_space)):
        raise ValueError(f"feature_space must be lowercase letters and digits other than "
                         f"'pixels' (it ends every key, after the last underscore), got "
                         f"{feature_space!r}")
    real, fake = _check_images(real_uint8), _check_images(fake_uint8)
    spaces = {"pixels": pixel_features}
    if features_fn is not None:
        spaces[feature_space] = features_fn
    metrics = {}
    for space, features in spaces.items():
        real_features, fake_features = features(real), features(fake)
        manifold = {**precision_recall(real_features, fake_features),
                    **density_coverage(real_features, fake_features)}
        metrics.update({f"{name}_{space}": value for name, value in manifold.items()})
    pixels = {**sliced_wasserstein(real, fake, seed=seed), **image_statistics(fake),
              **statistics_gap(real, fake)}
    metrics.update({f"{name}_pixels": value for name, value in pixels.items()})
    return metrics
