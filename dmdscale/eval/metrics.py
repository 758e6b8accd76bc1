"""Evaluation for image students: FID and KID through clean-fid, class accuracy, sample grids.

clean-fid's standard Inception weights are fetched from the network on first use, which is
impossible on offline machines, and Inception features are a poor yardstick for 16x16 digits
anyway. So dmdscale trains its own small digit classifier (seconds on CPU), caches it with
safetensors, and hands clean-fid a wrapper around the classifier's penultimate features as
`custom_feat_extractor`. The images go through clean-fid's "clean" resizing (computed in
memory, `clean_resize`, rather than through PNG folders) and its FID and KID, so the figures
are clean-fid's computation with a different feature network.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
import platform
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from dmdscale.data.images import to_model_space as to_model_input  # the one conversion
from dmdscale.data.images import to_uint8

__all__ = [
    "DigitClassifier",
    "CleanFIDFeatures",
    "to_model_input",
    "train_classifier",
    "load_or_train_classifier",
    "class_accuracy",
    "classifier_features",
    "sample_quality_of",
    "compute_fid",
    "compute_fid_kid",
    "generate",
    "clean_resize",
    "image_features",
    "inception_weights_path",
    "write_png_folder",
]

# Bump when the training procedure changes in a way the hyperparameters do not capture,
# so that stale cached classifiers are not reused.
_CACHE_VERSION = "1"


class DigitClassifier(nn.Module):
    """Small CNN for (B, C, R, R) images in [-1, 1]; its penultimate layer is the FID feature.

    Adaptive pooling to 4x4 keeps the same layer sizes for any resolution >= 4, so one
    architecture serves 8x8 to 64x64 digit-like data.
    """

    def __init__(self, num_classes: int = 10, channels: int = 1, resolution: int = 16,
                 feature_dim: int = 128):
        super().__init__()
        self.num_classes, self.channels, self.resolution = num_classes, channels, resolution
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(64 * 16, feature_dim),
        )
        # The ReLU sits in the head so the features are pre-activation: no dead (constant)
        # dimensions, hence a full-rank covariance for the Frechet distance.
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))

    def config(self) -> dict[str, int]:
        """Constructor arguments, stored next to the weights so a cache file rebuilds itself."""
        return {"num_classes": self.num_classes, "channels": self.channels,
                "resolution": self.resolution, "feature_dim": self.feature_dim}

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, D): what FID compares."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (B, num_classes)."""
        return self.head(self.features(x))


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Per-sample random shift (+-1.5 px), rotation (+-10 deg) and scale (0.9-1.1), so the
    classifier's features do not hinge on exact pixel placement (generated digits wander)."""
    b, _, h, _ = x.shape
    angle = (torch.rand(b, generator=generator) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(b, generator=generator) * 2 - 1) * 0.1
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * (1.5 * 2 / h)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def train_classifier(images: np.ndarray, labels: np.ndarray, steps: int = 500,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     progress: bool = True, num_classes: int = 10) -> DigitClassifier:
    """Fit a DigitClassifier with AdamW and a one-cycle learning rate on uint8 NHWC images.

    Runs inside `torch.random.fork_rng` with its own seed so it is reproducible (the cache key
    relies on that) and leaves the caller's random state untouched.
    """
    x_all = to_model_input(images)
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    _, c, r, _ = x_all.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = DigitClassifier(num_classes=num_classes, channels=c, resolution=r)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        model.train()
        bar = tqdm(range(steps), desc="train digit classifier", disable=not progress,
                   mininterval=1.0, leave=False)
        for _ in bar:
            idx = torch.randint(len(x_all), (batch_size,), generator=gen)
            loss = F.cross_entropy(model(_augment(x_all[idx], gen)), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def _cache_key(images: np.ndarray, labels: np.ndarray, hparams: dict) -> str:
    """Hash of everything that determines the trained weights: data bytes and shapes,
    training hyperparameters and the architecture (the module's repr lists every layer)."""
    h = hashlib.sha256()
    images, labels = np.ascontiguousarray(images), np.ascontiguousarray(labels, dtype=np.int64)
    h.update(f"{images.dtype}{images.shape}{labels.shape}".encode())
    h.update(images.tobytes())
    h.update(labels.tobytes())
    h.update(json.dumps(hparams, sort_keys=True).encode())
    _, r, _, c = images.shape
    arch = DigitClassifier(hparams.get("num_classes", 10), c, r)
    h.update(repr(arch).encode())
    h.update(json.dumps(arch.config(), sort_keys=True).encode())
    h.update(_CACHE_VERSION.encode())
    return h.hexdigest()[:20]


def load_or_train_classifier(cache_dir: str | os.PathLike, images: np.ndarray,
                             labels: np.ndarray, **train_kwargs) -> DigitClassifier:
    """Load the classifier for exactly this data and these settings from `cache_dir`, or train
    and store it there (safetensors, never pickle), so repeated evaluations share one model.

    The write goes to a temporary file that is then renamed, so concurrent evaluators never
    read a half-written file.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    bound = inspect.signature(train_classifier).bind(images, labels, **train_kwargs)
    bound.apply_defaults()
    hparams = {k: v for k, v in bound.arguments.items()
               if k not in ("images", "labels", "progress")}
    cache_dir = Path(cache_dir)
    path = cache_dir / f"digit_classifier_{_cache_key(images, labels, hparams)}.safetensors"
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            config = {k: int(v) for k, v in json.loads(f.metadata()["config"]).items()}
        model = DigitClassifier(**config)
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    model = train_classifier(images, labels, **train_kwargs)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    os.close(fd)
    metadata = {"config": json.dumps(model.config()), "hparams": json.dumps(hparams)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata=metadata)
    os.replace(tmp, path)
    return model


@torch.no_grad()
def class_accuracy(classifier: DigitClassifier, images_uint8: np.ndarray,
                   labels: np.ndarray, batch_size: int = 512) -> float:
    """Fraction of images the classifier assigns to the class they were generated for: for a
    class-conditional student, how often it draws the digit it was asked for."""
    classifier.eval()
    x = to_model_input(images_uint8)
    preds = torch.cat([classifier(chunk).argmax(1) for chunk in x.split(batch_size)])
    return float((preds.numpy() == np.asarray(labels)).mean())


def classifier_features(classifier: DigitClassifier, batch_size: int = 512) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 NHWC images -> (N, D) penultimate classifier features (what the FID compares), as
    `diversity.sample_quality` takes them."""
    @torch.no_grad()
    def features(images_uint8: np.ndarray) -> np.ndarray:
        x = to_model_input(images_uint8)
        return torch.cat([classifier.eval().features(chunk) for chunk in x.split(batch_size)]).numpy()

    return features


def sample_quality_of(who: str, real_images: np.ndarray, images: np.ndarray,
                      classifier: DigitClassifier | None = None, seed: int = 0) -> dict[str, float]:
    """`diversity.sample_quality` of `who`'s images against the real ones, every key
    `<quantity>_<space>_<who>` (e.g. `swd_pixels_student`, `recall_classifier_teacher`): in
    pixels always (label-free), and on the classifier's features when there is one. The one
    call the final evaluation and the checkpoint evaluation actors both make."""
    from dmdscale.eval.diversity import sample_quality

    space = {"features_fn": classifier_features(classifier), "feature_space": "classifier"} if classifier else {}
    return {f"{k}_{who}": v for k, v in sample_quality(real_images, images, seed=seed, **space).items()}


@functools.lru_cache(maxsize=None)
def sample_quality_names(resolution: int, channels: int, feature_space: str | None = None) -> frozenset[str]:
    """The `<quantity>_<space>` names `sample_quality` reports for images of this shape, read
    off a call on a few random images so the list cannot drift from the figures. The call is
    made at 16 px at most (seconds at 1024 px); only SWD's pyramid levels depend on the size."""
    import re

    from dmdscale.eval.diversity import pyramid_resolutions, sample_quality

    small = min(resolution, 16)
    images = np.random.default_rng(0).integers(1, 255, (8, small, small, channels), dtype=np.uint8)
    space = {"features_fn": lambda x: x.reshape(len(x), -1).astype(np.float64),
             "feature_space": feature_space} if feature_space else {}
    names = {k for k in sample_quality(images, images[::-1].copy(), **space) if not re.fullmatch(r"swd\d+_pixels", k)}
    return frozenset(names | {f"swd{r}_pixels" for r in pyramid_resolutions(resolution)})


class CleanFIDFeatures(nn.Module):
    """A DigitClassifier seen through clean-fid's input pipeline, for `custom_feat_extractor`.

    clean-fid (mode "clean") opens each file, converts it to RGB, resizes every channel to
    299x299 with PIL bicubic in float32 (clipped to [0, 255], not quantised) and batches them:
    the extractor receives float32 (B, 3, 299, 299) with values in [0, 255] and must return
    features (B, D). This undoes that: grayscale if the classifier has one channel, an
    antialiased area resize back to the classifier's resolution, then the [-1, 1] scaling of
    `to_model_input`.
    """

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval()

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) float in [0, 255] -> (B, D) penultimate classifier features."""
        x = x.float()
        if self.classifier.channels == 1:
            x = TF.rgb_to_grayscale(x, num_output_channels=1)
        r = self.classifier.resolution
        x = F.interpolate(x, size=(r, r), mode="area")
        x = x.clamp(0, 255) / 127.5 - 1.0
        return self.classifier.features(x)


def inception_weights_path() -> Path:
    """Where clean-fid looks for its TorchScript Inception (cleanfid.features.feature_extractor
    uses "/tmp" on non-Windows, file name from cleanfid.downloads_helper.inception_url)."""
    from cleanfid import downloads_helper

    folder = "./" if platform.system() == "Windows" else "/tmp"
    return Path(folder) / os.path.basename(downloads_helper.inception_url)


def write_png_folder(images_uint8_nhwc: np.ndarray, folder: str | os.PathLike) -> Path:
    """Write images as zero-padded, sortable PNGs (grayscale for C=1), for clean-fid's folder
    functions (the reference `clean_resize` is checked against): it reads folders in sorted
    order, so file i is image i."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images_uint8_nhwc):
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(folder / f"{i:06d}.png")
    return folder


def _feature_extractor(extractor: str | nn.Module) -> nn.Module:
    """Resolve the `extractor` argument to the module the resized images go through:
    "inception" is clean-fid's own Inception, built as its compute_fid builds it (only if its
    weights are already on disk: clean-fid would otherwise download them)."""
    if isinstance(extractor, DigitClassifier):
        return CleanFIDFeatures(extractor)
    if isinstance(extractor, nn.Module):
        return extractor
    if extractor == "inception":
        path = inception_weights_path()
        if not path.exists():
            raise FileNotFoundError(
                f"clean-fid's Inception weights are not at {path} and dmdscale never downloads "
                "them; pass a DigitClassifier (see load_or_train_classifier) as the extractor, "
                "or place inception-2015-12-05.pt at that path.")
        from cleanfid.features import build_feature_extractor

        return build_feature_extractor("clean", torch.device("cpu"), use_dataparallel=False)
    raise ValueError(f"unknown extractor {extractor!r}: use 'inception' or a DigitClassifier")


# clean-fid draws KID's random subsets from numpy's global RNG; a fixed draw makes KID a
# function of the images alone, so two evaluations of the same images agree.
KID_SEED = 0

# clean-fid's "clean" mode resizes every image to this size before the feature network.
CLEAN_SIZE = 299


@functools.lru_cache(maxsize=None)
def _pil_bicubic_matrix(size_in: int, size_out: int = CLEAN_SIZE) -> Tensor:
    """(size_out, size_in): PIL's float bicubic resize of one axis as a matrix, read off PIL
    itself by resizing unit rows (resizing is linear; PIL's edge renormalisation included)."""
    columns = []
    for j in range(size_in):
        row = np.zeros((1, size_in), np.float32)
        row[0, j] = 1.0
        columns.append(np.asarray(Image.fromarray(row).resize((size_out, 1), resample=Image.BICUBIC))[0])
    return torch.from_numpy(np.stack(columns, axis=1))


def clean_resize(images_uint8_nhwc: np.ndarray) -> Tensor:
    """clean-fid's "clean" input pipeline in memory, for a batch: what its folder loader does
    to a PNG of each image (convert to RGB; resize each channel to 299x299 with PIL bicubic in
    float32; clip to [0, 255]), as two matrix products per channel, the same figures to float
    rounding (tests/unit/test_eval_metrics.py compares it with clean-fid's own resizer), and
    about 7x faster than writing and re-reading PNGs (bench/fid_features.py). Returns float32 (B, 3, 299, 299), a grayscale
    image's three channels one tensor's view."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8_nhwc)).permute(0, 3, 1, 2).float()
    rows, cols = _pil_bicubic_matrix(x.shape[2]), _pil_bicubic_matrix(x.shape[3])
    resized = (rows @ x @ cols.T).clamp_(0, 255)
    return resized.expand(-1, 3, -1, -1) if resized.shape[1] == 1 else resized  # grayscale PNG -> RGB


def image_features(images_uint8_nhwc: np.ndarray, extractor: str | nn.Module, batch_size: int = 100) -> np.ndarray:
    """(N, D) features of uint8 NHWC images as clean-fid computes them in "clean" mode, with
    clean-fid's Inception ("inception") or a custom extractor (a DigitClassifier is wrapped in
    CleanFIDFeatures), on the CPU."""
    feat_model = _feature_extractor(extractor)
    with torch.no_grad():
        return np.concatenate([feat_model(clean_resize(images_uint8_nhwc[i:i + batch_size])).numpy()
                               for i in range(0, len(images_uint8_nhwc), batch_size)])


def _fid(gen_feats: np.ndarray, ref_feats: np.ndarray) -> float:
    """clean-fid's Frechet distance between the features' Gaussians (mean, covariance)."""
    from cleanfid import fid as cleanfid_fid

    with warnings.catch_warnings():  # clean-fid passes scipy's deprecated sqrtm(disp=)
        warnings.filterwarnings("ignore", ".*`disp` argument", DeprecationWarning)
        return float(cleanfid_fid.fid_from_feats(gen_feats, ref_feats))


def _kid(gen_feats: np.ndarray, ref_feats: np.ndarray, rescale: bool = False) -> float:
    """clean-fid's unbiased KID (cubic polynomial kernel (x.y / d + 1)^3, 100 subsets of up to
    1000) with the subsets drawn from a KID_SEED state; the caller's global numpy RNG state is
    restored. (Other threads drawing from numpy's global RNG meanwhile would shift the draw.)

    The kernel is sized for Inception's features (x.y / d well below 1). With `rescale`, both
    sets are divided by the reference set's RMS feature value first, so x.x / d is ~1: the digit
    classifier's features are ~60x larger, which made the kernel values ~1e4 and the estimate's
    noise larger than the differences it should show (teacher vs held-out digits read -72)."""
    from cleanfid import fid as cleanfid_fid

    if rescale:
        scale = float(np.sqrt(np.mean(np.square(ref_feats, dtype=np.float64))))
        gen_feats, ref_feats = gen_feats / scale, ref_feats / scale

    saved = np.random.get_state()
    np.random.set_state(np.random.RandomState(KID_SEED).get_state())
    try:
        return float(cleanfid_fid.kernel_distance(gen_feats, ref_feats))
    finally:
        np.random.set_state(saved)


def _features_of_both(gen_images: np.ndarray, ref_images: np.ndarray,
                      extractor: str | nn.Module) -> tuple[np.ndarray, np.ndarray]:
    if len(gen_images) < 2 or len(ref_images) < 2:
        raise ValueError("FID and KID need at least two images in each set")
    feat_model = _feature_extractor(extractor)  # built once: Inception loads its weights from disk
    return image_features(gen_images, feat_model), image_features(ref_images, feat_model)


def compute_fid_kid(gen_images: np.ndarray, ref_images: np.ndarray,
                    extractor: str | nn.Module) -> tuple[float, float]:
    """(FID, KID) between two uint8 NHWC image sets, both computed by clean-fid on the same
    features, extracted once per set. KID is unbiased: its expectation does not depend on the
    sample size, where FID's is biased upward at small sizes. Both are deterministic. On a
    custom extractor's features (the digit classifier) KID's kernel sees them rescaled (`_kid`).
    """
    feats = _features_of_both(gen_images, ref_images, extractor)
    return _fid(*feats), _kid(*feats, rescale=not isinstance(extractor, str))


def compute_fid(gen_images: np.ndarray, ref_images: np.ndarray, extractor: str | nn.Module) -> float:
    """FID between two uint8 NHWC image sets (as `compute_fid_kid`, without the KID)."""
    return _fid(*_features_of_both(gen_images, ref_images, extractor))


@torch.no_grad()
def generate(fn, labels: np.ndarray, shape: tuple[int, int, int], seed: int, batch: int = 250,
             desc: str = "sample") -> np.ndarray:
    """Run `fn(noise, labels)` in chunks with fixed noise; uint8 NHWC images."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in tqdm(range(0, len(labels), batch), desc=desc, dynamic_ncols=True):
        y = torch.tensor(labels[i:i + batch], dtype=torch.long)  # a copy: Ray hands actors read-only arrays
        out.append(to_uint8(fn(torch.randn((len(y), *shape), generator=g), y)))
    return np.concatenate(out)


def sample_student(student: nn.Module, timesteps: list[int], labels: np.ndarray,
                   shape: tuple[int, int, int], seed: int, device: torch.device | str | None = None,
                   batch: int = 250, desc: str = "sample student") -> np.ndarray:
    """A few-step student's evaluation images (uint8 NHWC): `generate` with fixed noise, and
    the re-noising between steps drawn from a generator seeded by `seed` too, so multi-step
    students give the same images every time (one-step students never re-noise: their images
    equal `generate(lambda z, y: sample(student, student.schedule, z, timesteps, y), ...)`).
    Noise is drawn on the CPU and moved to `device` (default: the student's)."""
    from dmdscale.core import seeds
    from dmdscale.core.sampling import sample

    device = torch.device(device) if device is not None else next(student.parameters()).device
    renoise = torch.Generator(device=device).manual_seed(seeds.evaluation_renoise(seed))

    def fn(z: Tensor, y: Tensor) -> Tensor:
        return sample(student, student.schedule, z.to(device), timesteps, y.to(device), rng=renoise)

    return generate(fn, labels, shape, seed, batch=batch, desc=desc)
