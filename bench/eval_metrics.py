"""What each evaluation metric sees: sample sets with known defects scored against real images.

Two data sets at 16x16, the demo's resolution: coloured shapes (RGB on black; circle, square or
triangle is the label, colour, position and size are free; 1000 reference images, 1000
samples) and scikit-learn's digits (8x8 upsampled with PIL bilinear, grayscale; half of the
1797 as reference, samples of as many held-out digits as there are 0-4s, about 450). The
samples are scored as they are (the floor: real against real) and with one defect each:

- grey: RGB blended 70% towards its luminance (shapes); grayscale blended 70% towards each
  image's mean, a loss of contrast (digits). The shapes and classes are untouched.
- hue_band (shapes): new shapes whose colour is confined to one narrow hue band per class,
  so every class is present in all positions and sizes but in one colour.
- duplicated: 3 images per class repeated to the full count (class-preserving mode collapse).
- blurred (digits): Gaussian blur, radius 1 px.
- classes_dropped (digits): the held-out digits 0-4 only.

Metrics: `dmdscale.eval.dv.sample_quality` with the project's label-trained classifier
as the named feature space, plus two Frechet distances computed directly on features (no
clean-fid PNG round trip, which costs seconds per call): `fd_classifier` (what FID measures
today) and `fd_autoencoder`, on the bottleneck of an autoencoder trained without labels on the
reference images, the alternative to SWD as the label-free distance (`label_free_choice` in
the JSON says which separates defects from the floor better). Every figure is given per
seed, as mean, spread (max - min over seeds) and ratio to the floor's mean; seconds per call
are the fastest of three calls on the floor. A seed changes the split, the shapes, the
networks' initialisation and the metrics' random draws. A design check compares SWD with
ProGAN's per-set normalisation against the reference normalisation used here.

    python bench/eval_metrics.py [--seeds 0 1]

(about 5 minutes on 2 shared CPU cores; where other processes load the cores, set
OMP_NUM_THREADS=1: torch's second thread then only waits for its turn.)

Writes bench/results/eval_metrics.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cleanfid.fid import frechet_distance
from PIL import Image, ImageFilter
from sklearn.datasets import load_digits
from torch import nn

from dmdscale.data.shapes import colored_shapes
from dmdscale.eval import diversity as dv
from dmdscale.eval.metrics import to_model_input, train_classifier

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 16
CLASSIFIER_STEPS = 1000
AUTOENCODER_STEPS = 500
HUE_BANDS = (0.0, 0.33, 0.67)  # one per shape class: red, green, blue
LABEL_FREE = ("swd_pixels", "fd_autoencoder")  # the candidates for the label-free distance

FeaturesFn = Callable[[np.ndarray], np.ndarray]


def device_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + " (CPU)"
    return platform.processor() or "CPU"


# --- data and defects ----------------------------------------------------------------------


def digits16() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 digits, 8x8 upsampled to 16x16 with PIL bilinear, uint8 NHWC."""
    digits = load_digits()
    small = np.round(digits.images / 16 * 255).astype(np.uint8)
    size = (RESOLUTION, RESOLUTION)
    images = np.stack([np.asarray(Image.fromarray(x).resize(size, Image.BILINEAR)) for x in small])
    return images[..., None], digits.target


def grey(images: np.ndarray) -> np.ndarray:
    """70% of the way to grey: RGB towards its luminance, grayscale towards the image mean."""
    x = images.astype(np.float64)
    if x.shape[-1] == 3:
        target = (x @ np.array([0.299, 0.587, 0.114]))[..., None]
    else:
        target = x.mean(axis=(1, 2, 3), keepdims=True)
    return np.round(0.3 * x + 0.7 * target).astype(np.uint8)


def blurred(images: np.ndarray) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(x[..., 0]).filter(ImageFilter.GaussianBlur(1)))
                     for x in images])[..., None]


def duplicated(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
               per_class: int = 3) -> np.ndarray:
    """`per_class` images of every class, repeated at random to len(images)."""
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])
    return images[rng.choice(keep, len(images))]


Variants = tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]  # reference, labels, sample sets


def shapes_variants(seed: int, n: int = 1000) -> Variants:
    """Reference images, their labels, and the sample sets (same count each)."""
    real, labels = colored_shapes(n, seed)
    held, held_labels = colored_shapes(n, seed + 1000)
    return real, labels, {
        "floor": held,
        "grey": grey(held),
        "hue_band": colored_shapes(n, seed + 2000, HUE_BANDS)[0],
        "duplicated": duplicated(held, held_labels, np.random.default_rng(seed)),
    }


def digits_variants(seed: int) -> Variants:
    """Half the digits as reference; sample sets of as many held-out digits as there are 0-4s."""
    images, labels = digits16()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    ref, held = order[: len(order) // 2], order[len(order) // 2:]
    low = held[labels[held] < 5]
    floor = rng.choice(held, len(low), replace=False)
    return images[ref], labels[ref], {
        "floor": images[floor],
        "grey": grey(images[floor]),
        "blurred": blurred(images[floor]),
        "duplicated": duplicated(images[floor], labels[floor], rng),
        "classes_dropped": images[low],
    }


# --- feature networks ----------------------------------------------------------------------


class AutoEncoder(nn.Module):
    """Convolutional autoencoder with a 64-d bottleneck for 16x16 images in [-1, 1]."""

    def __init__(self, channels: int, dim: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(64 * 4 * 4, dim))
        self.decoder = nn.Sequential(
            nn.Linear(dim, 64 * 4 * 4), nn.ReLU(), nn.Unflatten(1, (64, 4, 4)),
            nn.ConvTranspose2d(64, 64, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def train_autoencoder(images: np.ndarray, seed: int, steps: int = AUTOENCODER_STEPS,
                      batch_size: int = 64) -> AutoEncoder:
    """Fit by mean squared reconstruction error: no labels, only the reference images."""
    x = to_model_input(images)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = AutoEncoder(x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(steps):
        batch = x[torch.randint(len(x), (batch_size,), generator=generator)]
        loss = F.mse_loss(model(batch), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def features_of(module: Callable[[torch.Tensor], torch.Tensor]) -> FeaturesFn:
    def features(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(to_model_input(images)).double().numpy()
    return features


def frechet(real_features: np.ndarray, fake_features: np.ndarray) -> float:
    return float(frechet_distance(real_features.mean(0), np.cov(real_features, rowvar=False),
                                  fake_features.mean(0), np.cov(fake_features, rowvar=False)))


def timed(fn: Callable, *args, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def best_time(fn: Callable, *args, repeats: int = 3, **kwargs) -> float:
    """Fastest of `repeats` calls: on a shared 2-core machine the others measure the neighbours."""
    return min(timed(fn, *args, **kwargs)[1] for _ in range(repeats))


# --- measurement ---------------------------------------------------------------------------


def swd_own_normalisation(real: np.ndarray, fake: np.ndarray, seed: int) -> float:
    """SWD with ProGAN's normalisation (each set by its own patch statistics), for the design
    check of normalising both by the reference's."""
    resolutions = dv.pyramid_resolutions(real.shape[1])
    levels = [dv._laplacian_pyramid(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255,
                                    len(resolutions)) for x in (real, fake)]
    directions = torch.Generator().manual_seed(seed)
    distances = []
    for resolution, real_level, fake_level in zip(resolutions, *levels):
        count = min(2**14, len(real) * (resolution - 6) ** 2, len(fake) * (resolution - 6) ** 2)
        a, b = (dv._patches(level, 7, count, seed) for level in (real_level, fake_level))
        per_channel = [p.reshape(count, real_level.shape[1], -1) for p in (a, b)]
        a, b = ((p - p.mean(dim=(0, 2), keepdim=True)) / p.std(dim=(0, 2), keepdim=True)
                for p in per_channel)
        distances.append(1e3 * dv._sliced_distance(a.reshape(count, -1), b.reshape(count, -1),
                                                   256, directions))
    return float(np.mean(distances))


def run_seed(name: str, seed: int) -> tuple[dict, dict, dict]:
    """(metrics by variant, seconds per call by metric, design checks) for one data set and seed."""
    real, labels, variants = shapes_variants(seed) if name == "shapes" else digits_variants(seed)
    classifier, train_s = timed(train_classifier, real, labels, steps=CLASSIFIER_STEPS, seed=seed,
                                progress=False, num_classes=int(labels.max()) + 1)
    autoencoder, ae_train_s = timed(train_autoencoder, real, seed)
    by_classifier, encoded = features_of(classifier.features), features_of(autoencoder.encoder)
    # The bottleneck's scale is arbitrary and differs from seed to seed: standardise it by the
    # reference's per-dimension spread so that its Frechet distance is comparable across seeds.
    spread = encoded(real).std(axis=0)

    def by_autoencoder(images: np.ndarray) -> np.ndarray:
        return encoded(images) / spread

    real_classifier, real_autoencoder = by_classifier(real), by_autoencoder(real)
    metrics, seconds = {}, {"train_classifier": train_s, "train_autoencoder": ae_train_s}
    for variant, fake in variants.items():
        scores = dv.sample_quality(real, fake, by_classifier, "classifier", seed=seed)
        scores["fd_classifier"] = frechet(real_classifier, by_classifier(fake))
        scores["fd_autoencoder"] = frechet(real_autoencoder, by_autoencoder(fake))
        metrics[variant] = scores
        if variant == "floor":  # time each part on the floor
            seconds["sample_quality"] = best_time(dv.sample_quality, real, fake, by_classifier,
                                                  "classifier", seed=seed)
            seconds["sliced_wasserstein"] = best_time(dv.sliced_wasserstein, real, fake, seed=seed)
            pixels_real, pixels_fake = dv.pixel_features(real), dv.pixel_features(fake)
            seconds["precision_recall_pixels"] = best_time(dv.precision_recall, pixels_real, pixels_fake)
            seconds["density_coverage_pixels"] = best_time(dv.density_coverage, pixels_real, pixels_fake)
            seconds["image_statistics_and_gap"] = best_time(
                lambda images: (dv.image_statistics(images), dv.statistics_gap(real, images)),
                fake)
            seconds["fd_autoencoder_features"] = best_time(
                lambda images: frechet(real_autoencoder, by_autoencoder(images)), fake)
    design = {f"swd_own_normalisation_{variant}": swd_own_normalisation(real, variants[variant], seed)
              for variant in ("floor", "grey")}
    return metrics, seconds, design


def swd_seconds_by_resolution(count: int = 2000) -> dict[str, float]:
    """SWD's cost for `count` against `count` images as the resolution grows (the shapes,
    enlarged by pixel repetition: the cost depends on the sizes, not the content)."""
    real, fake = colored_shapes(count, 0)[0], colored_shapes(count, 1)[0]
    seconds = {}
    for factor in (1, 2, 4):
        a, b = (x.repeat(factor, axis=1).repeat(factor, axis=2) for x in (real, fake))
        seconds[f"{RESOLUTION * factor}px"] = best_time(dv.sliced_wasserstein, a, b)
    return seconds


def summarise(per_seed: list[dict[str, float]]) -> dict:
    values = {key: [s[key] for s in per_seed] for key in per_seed[0]}
    return {key: {"values": v, "mean": statistics.fmean(v), "spread": max(v) - min(v)}
            for key, v in values.items()}


def label_free_choice(results: dict) -> dict:
    """SWD against autoencoder features as the label-free distance. For each, the worst case
    over defects and data sets of (defect - floor) in units of the larger of their seed
    spreads, and of defect / floor (FD is a squared distance, SWD is not: its ratios run
    about squared). The autoencoder is chosen only if it separates at least twice as well in
    the worst case, since it also costs a training run per data set and SWD none."""
    rows = {}
    for candidate in LABEL_FREE:
        separations, ratios = [], []
        for data in results.values():
            floor = data["metrics"]["floor"][candidate]
            for variant, scores in data["metrics"].items():
                if variant == "floor":
                    continue
                defect = scores[candidate]
                noise = max(floor["spread"], defect["spread"], 1e-12)
                separations.append((defect["mean"] - floor["mean"]) / noise)
                ratios.append(defect["mean"] / floor["mean"])
        rows[candidate] = {"worst_separation_in_spreads": min(separations),
                           "worst_ratio_to_floor": min(ratios)}
    rows["train_seconds_autoencoder"] = statistics.fmean(
        s for data in results.values() for s in data["seconds"]["train_autoencoder"]["values"])
    ae, swd = (rows[c]["worst_separation_in_spreads"] for c in ("fd_autoencoder", "swd_pixels"))
    rows["chosen"] = "fd_autoencoder" if ae >= 2 * swd else "swd_pixels"
    return rows


def print_table(results: dict) -> None:
    for name, data in results.items():
        variants = list(data["metrics"])
        print(f"\n{name}: mean +- half the spread over seeds, (ratio to floor)")
        print(f"  {'metric':32s} " + " | ".join(f"{v:>22s}" for v in variants))
        for key in data["metrics"]["floor"]:
            if re.fullmatch(r"channel_(mean|std)_\d+_pixels", key):
                continue  # the raw channel figures; their gaps and ratios are shown
            cells = []
            for variant in variants:
                figure = data["metrics"][variant][key]
                ratio = figure["ratio_to_floor"]
                cells.append(f"{figure['mean']:.3g} +- {figure['spread'] / 2:.2g}"
                             + (f" ({ratio:.2f})" if ratio is not None and variant != "floor" else ""))
            print(f"  {key:32s} " + " | ".join(f"{c:>22s}" for c in cells))
        print("  seconds per call: " + ", ".join(f"{k} {v['mean']:.2f}" for k, v in data["seconds"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    results = {}
    for name in ("shapes", "digits"):
        runs = [run_seed(name, seed) for seed in args.seeds]
        metrics = {variant: summarise([m[variant] for m, _, _ in runs]) for variant in runs[0][0]}
        floor = metrics["floor"]
        for variant in metrics.values():
            for key, figure in variant.items():
                # Gaps (samples - reference) are about 0 on the floor: no ratio.
                figure["ratio_to_floor"] = (figure["mean"] / floor[key]["mean"]
                                            if floor[key]["mean"] and "gap" not in key else None)
        results[name] = {"metrics": metrics, "seconds": summarise([s for _, s, _ in runs]),
                         "design_checks": summarise([d for _, _, d in runs])}
    out = {
        "command": " ".join(["python bench/eval_metrics.py", *sys.argv[1:]]),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(), "torch_threads": torch.get_num_threads(),
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "seeds": args.seeds, "resolution": RESOLUTION, "classifier_steps": CLASSIFIER_STEPS,
        "autoencoder_steps": AUTOENCODER_STEPS, "label_free_choice": label_free_choice(results),
        "sliced_wasserstein_seconds_2000_images": swd_seconds_by_resolution(),
        "results": results, "total_seconds": time.perf_counter() - started,
    }
    path = ROOT / "bench" / "results" / "eval_metrics.json"
    path.write_text(json.dumps(out, indent=2))
    print_table(results)
    print(json.dumps({key: out[key] for key in ("label_free_choice", "sliced_wasserstein_seconds_2000_images")},
                     indent=2), f"\n{path} in {out['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
