"""Text-to-image metrics: CLIP score, FID feature extractors, cached reference statistics.

Everything loads from local files: a CLIP model folder through transformers (`load_clip`),
clean-fid's TorchScript Inception from a given file (`load_inception`). A missing file is a
`FileNotFoundError` naming the path to provide; nothing is downloaded.

- CLIP score: 100 * max(cos(image embedding, text embedding), 0), averaged over the pairs, as
  torchmetrics' CLIPScore and the DMD2 authors compute it.
- FID features: clean-fid's Inception, or CLIP image embeddings ("FD_CLIP", as Kynkaanniemi
  et al. 2023 and clean-fid's `clip_vit_b_32` mode use). Both receive clean-fid's "clean"
  299x299 resize (`dmdscale.eval.metrics.image_features`), so the figures are clean-fid's.
- Reference statistics (mean, covariance) of the real images, computed once and cached as
  .npz keyed by (real source, resolution, extractor, patches), as clean-fid's custom stats.
- Patch FID: the same statistics on tiles at the Inception input size cut from the full
  resolution images (`regular_crops`), so fine detail counts that a whole-image downscale to
  299 px hides (SDXL-Lightning's and the DMD2 SDXL evaluation's "patch FID").
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmdscale.errors import UserError

__all__ = ["Clip", "ClipImageFeatures", "ClipModelNotFound", "InceptionNotFound", "ReferenceStatsError", "load_clip",
           "check_clip_model", "inception_file", "load_inception", "pipeline_images",
           "clip_image_embeddings", "clip_text_embeddings", "clip_score", "fid_features", "fid_kid",
           "feature_stats", "frechet_distance", "reference_stats", "read_stats", "regular_crops", "resize_images",
           "real_image_chunks", "save_prompt_grid", "INCEPTION_SIZE"]

INCEPTION_SIZE = 299  # clean-fid's (and Inception's) input size: the patch size of patch FID
_STATS_VERSION = "1"  # bump when the statistics' computation changes: stale caches are then not reused
# What CLIPProcessor.save_pretrained writes for the image processor: transformers 5 nests it in
# processor_config.json, 4.x wrote preprocessor_config.json; CLIPImageProcessor reads either.
_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class ClipModelNotFound(UserError, FileNotFoundError):
    """eval.clip_model / --clip-model is not a loadable local CLIP model; the message names it."""


class InceptionNotFound(UserError, FileNotFoundError):
    """clean-fid's Inception weights are not where eval.inception_weights / --inception says."""


class ReferenceStatsError(UserError, ValueError):
    """Reference statistics that cannot be used (missing, unreadable, or measured otherwise)."""


@dataclasses.dataclass
class Clip:
    """A CLIP model with what feeds it: the image processor's size and normalisation, the tokenizer."""

    model: Any  # transformers CLIPModel
    tokenizer: Any
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    source: str  # the folder it came from (part of the reference statistics' cache key)


def load_clip(path: str | os.PathLike, what: str = "eval.clip_model", device: torch.device | str = "cpu") -> Clip:
    """The CLIPModel, tokenizer and image processor saved in `path` (save_pretrained of each),
    or a hub id already in the local cache; `what` names the setting in errors."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(path).expanduser()
    local = folder.is_dir()
    if not local and (folder.is_absolute() or str(path).startswith(".")):
        raise ClipModelNotFound(f"{what}: no CLIP model folder at {folder}; put a transformers CLIPModel there "
                                f"(CLIPModel, CLIPProcessor save_pretrained: config.json, weights, tokenizer files, "
                                f"processor_config.json or preprocessor_config.json)")
    source = str(folder.resolve()) if local else str(path)
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=True)
        processor = CLIPImageProcessor.from_pretrained(source, local_files_only=True)
    except OSError as exc:
        raise ClipModelNotFound(f"{what}: could not load a CLIP model from {source!r} without downloading "
                                f"(nothing is downloaded at run time; give a local folder holding CLIPModel, "
                                f"tokenizer and processor_config.json or preprocessor_config.json): "
                                f"{' '.join(str(exc).split())}") from None
    size = _side(processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size)
    return Clip(model.to(device).eval().requires_grad_(False), tokenizer, size,
                list(processor.image_mean), list(processor.image_std), source)


def _side(size: Any) -> int:
    """The side of a processor's square input size (an int, a dict or transformers 5's SizeDict)."""
    if isinstance(size, int):
        return size
    get = size.get if hasattr(size, "get") else (lambda k: getattr(size, k, None))
    return int(get("height") or get("shortest_edge"))


def _embedding(output: Any) -> Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return output if isinstance(output, Tensor) else output.pooler_output


class ClipImageFeatures(nn.Module):
    """(B, 3, H, W) float images in [0, 255] -> (B, D) CLIP image embeddings: a bicubic,
    antialiased resize to CLIP's input size and its normalisation (the processor's, on
    tensors). As an FID extractor it receives clean-fid's 299x299 images."""

    def __init__(self, clip: Clip):
        super().__init__()
        self.model, self.size = clip.model, clip.image_size
        self.register_buffer("mean", torch.tensor(clip.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(clip.std).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        device = self.mean.device
        x = x.to(device).float() / 255.0
        x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        return _embedding(self.model.get_image_features(pixel_values=x)).float().cpu()


@torch.no_grad()
def clip_image_embeddings(images_uint8_nhwc: np.ndarray, clip: Clip, batch_size: int = 64) -> Tensor:
    """(N, D) CLIP embeddings of uint8 NHWC RGB images."""
    features = ClipImageFeatures(clip).to(next(clip.model.parameters()).device)
    x = torch.from_numpy(np.ascontiguousarray(images_uint8_nhwc)).permute(0, 3, 1, 2)
    return torch.cat([features(chunk) for chunk in x.split(batch_size)])


@torch.no_grad()
def clip_text_embeddings(prompts: Sequence[str], clip: Clip, batch_size: int = 64) -> Tensor:
    """(N, D) CLIP embeddings of prompts (truncated to the text tower's context, as torchmetrics)."""
    device = next(clip.model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        tokens = clip.tokenizer(list(prompts[i:i + batch_size]), padding=True, truncation=True, return_tensors="pt")
        out.append(_embedding(clip.model.get_text_features(input_ids=tokens["input_ids"].to(device),
                                                           attention_mask=tokens["attention_mask"].to(device))))
    return torch.cat(out).float().cpu()


def clip_score(images_uint8_nhwc: np.ndarray, prompts: Sequence[str], clip: Clip) -> float:
    """Mean over the pairs of 100 * max(cos(image, prompt), 0) (torchmetrics' CLIPScore)."""
    if len(images_uint8_nhwc) != len(prompts):
        raise ValueError(f"CLIP score pairs images with prompts: {len(images_uint8_nhwc)} images, "
                         f"{len(prompts)} prompts")
    cos = F.cosine_similarity(clip_image_embeddings(images_uint8_nhwc, clip), clip_text_embeddings(prompts, clip))
    return float(100.0 * cos.clamp(min=0).mean())


class _Inception(nn.Module):
    """clean-fid's InceptionV3W (resize outside, "clean" mode) over a TorchScript file at any path."""

    def __init__(self, file: Path):
        super().__init__()
        from cleanfid.inception_torchscript import InceptionV3W

        self.wrapped = InceptionV3W.__new__(InceptionV3W)
        nn.Module.__init__(self.wrapped)
        self.wrapped.base = torch.jit.load(str(file), map_location="cpu").eval()
        self.wrapped.layers = self.wrapped.base.layers
        self.wrapped.resize_inside = False

    def forward(self, x: Tensor) -> Tensor:
        device = next(self.wrapped.base.parameters()).device
        return self.wrapped(x.to(device)).cpu()


def inception_file(path: str | os.PathLike | None, what: str = "eval.inception_weights",
                   must_exist: bool = True) -> Path:
    """Where clean-fid's Inception is read from: `path`, or clean-fid's own location when None;
    with `must_exist`, a missing file is an error naming the path to provide."""
    from dmdscale.eval.metrics import inception_weights_path

    file = Path(path).expanduser() if path is not None else inception_weights_path()
    if must_exist and not file.is_file():
        raise InceptionNotFound(f"{what}: clean-fid's Inception weights are not at {file}; dmdscale never downloads "
                                f"them: put inception-2015-12-05.pt (the StyleGAN2-ADA TorchScript file clean-fid "
                                f"uses) at that path")
    return file


def load_inception(path: str | os.PathLike | None, what: str = "eval.inception_weights") -> nn.Module:
    """clean-fid's Inception from `path` (None: clean-fid's own location); missing: an error naming it."""
    return _Inception(inception_file(path, what))


def check_clip_model(path: str | os.PathLike, what: str = "eval.clip_model") -> None:
    """Fail early (before any cluster work) on a CLIP folder that is not there or not a CLIPModel;
    a hub id is only checked when loaded."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        missing = [] if (folder / "config.json").is_file() else ["config.json"]
        if not any((folder / f).is_file() for f in _PROCESSOR_FILES):
            missing.append(" or ".join(_PROCESSOR_FILES))
        if missing:
            raise ClipModelNotFound(f"{what}: {folder} has no {' and no '.join(missing)} (expected CLIPModel and "
                                    f"CLIPProcessor save_pretrained output)")
    elif folder.is_absolute() or str(path).startswith(".") or folder.exists():
        raise ClipModelNotFound(f"{what}: no CLIP model folder at {folder}")


def fid_features(kind: str, *, inception: str | os.PathLike | None = None, clip: Clip | None = None) -> nn.Module:
    """The FID extractor by name: "inception" (clean-fid's, from `inception`) or "clip" (`clip`'s image tower)."""
    if kind == "inception":
        return load_inception(inception)
    if kind == "clip":
        if clip is None:
            raise ValueError("FID on CLIP features needs a CLIP model (eval.clip_model / --clip-model)")
        return ClipImageFeatures(clip)
    raise ValueError(f"unknown FID features {kind!r}: use 'inception' or 'clip'")


def fid_kid(gen_features: np.ndarray, real_features: np.ndarray, kind: str) -> tuple[float, float]:
    """(FID, KID) of two feature sets as `dmdscale.eval.metrics.compute_fid_kid` computes them;
    KID's kernel sees CLIP features rescaled (it is sized for Inception's), Inception's as they are."""
    from dmdscale.eval.metrics import _fid, _kid

    return _fid(gen_features, real_features), _kid(gen_features, real_features, rescale=kind != "inception")


def feature_stats(features: np.ndarray) -> dict[str, np.ndarray]:
    """{mu, sigma, count}: what FID keeps of a feature set (clean-fid's float64 statistics)."""
    feats = np.asarray(features, dtype=np.float64)
    if len(feats) < 2:
        raise ValueError("FID statistics need at least two images")
    return {"mu": feats.mean(0), "sigma": np.cov(feats, rowvar=False), "count": np.array(len(feats))}


def frechet_distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    """clean-fid's Frechet distance between two `feature_stats`."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet

    with warnings.catch_warnings():  # clean-fid passes scipy's deprecated sqrtm(disp=)
        warnings.filterwarnings("ignore", ".*`disp` argument", DeprecationWarning)
        return float(cleanfid_frechet(a["mu"], a["sigma"], b["mu"], b["sigma"]))


def reference_stats(key: dict[str, Any], cache_dir: str | os.PathLike,
                    features: Callable[[], np.ndarray | tuple[np.ndarray, int]]
                    ) -> tuple[dict[str, np.ndarray], Path, bool]:
    """(statistics, their .npz, whether they came from the cache) for the reference set `key`
    describes (real source, resolution, extractor, patches): computed with `features()` on the
    first call and written atomically, read back on every later one (the real images untouched).
    `features()` may also return how many real images it skipped (unreadable): kept in the .npz
    as `skipped`. The key is stored in the .npz as given: it should name no local path (a hash
    of one instead), so the file can be shared."""
    key = {**key, "version": _STATS_VERSION}
    text = json.dumps(key, sort_keys=True)
    cache_dir = Path(cache_dir).expanduser()
    path = cache_dir / f"reference_{hashlib.sha256(text.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        return read_stats(path, key), path, True
    computed = features()
    feats, skipped = computed if isinstance(computed, tuple) else (computed, 0)
    stats = {**feature_stats(feats), "skipped": np.array(int(skipped))}
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npz")
    os.close(fd)
    with open(tmp, "wb") as f:
        np.savez(f, **stats, key=np.array(text))
    os.replace(tmp, path)
    return stats, path, False


def read_stats(path: str | os.PathLike, expect: dict[str, Any] | None = None,
               what: str = "reference statistics") -> dict[str, np.ndarray]:
    """Statistics written by `reference_stats` ({mu, sigma, count, skipped}); with `expect`, its
    extractor, patch settings and resolution must match (FID across feature spaces or image
    sizes is meaningless). Any failure is a ReferenceStatsError naming `what` and the file."""
    import zipfile

    file = Path(path).expanduser()
    if not file.is_file():
        raise ReferenceStatsError(f"{what}: no .npz at {path}")
    if not zipfile.is_zipfile(file):
        raise ReferenceStatsError(f"{what}: {path} is not a .npz file (truncated, or something else); give "
                                  f"reference statistics this command wrote, or --real to compute them")
    try:
        with np.load(file, allow_pickle=False) as data:
            lacking = [k for k in ("mu", "sigma", "count", "key") if k not in data.files]
            if lacking:
                raise ValueError(f"it has no {', '.join(lacking)}")
            stats = {k: np.asarray(data[k]) for k in ("mu", "sigma", "count")}
            stats["skipped"] = np.asarray(data["skipped"]) if "skipped" in data.files else np.array(0)
            key = json.loads(str(data["key"]))
        dim = stats["mu"].shape
        if len(dim) != 1 or stats["sigma"].shape != dim * 2 or not isinstance(key, dict):
            raise ValueError(f"mu {dim} and sigma {stats['sigma'].shape} do not fit")
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        detail = " ".join(str(exc).split())
        raise ReferenceStatsError(f"{what}: {path} is not reference statistics this command wrote "
                                  f"(a .npz with mu, sigma, count and key): {detail}") from None
    for name in ("extractor", "patch_size", "resolution") if expect else ():
        if name not in expect:
            continue
        if key.get(name) != expect[name]:
            raise ReferenceStatsError(
                f"{what}: {path} holds reference statistics of {name} {key.get(name)!r}, this evaluation uses "
                f"{name} {expect[name]!r}; FID between statistics measured differently is meaningless: give "
                f"statistics computed with the same {name}")
    return stats


def regular_crops(images_uint8_nhwc: np.ndarray, size: int = INCEPTION_SIZE) -> np.ndarray:
    """Tiles of `size` x `size` from each image, ceil(H / size) per axis, evenly spread from
    edge to edge (overlapping where `size` does not divide H): patch FID's input."""
    _, h, w, _ = images_uint8_nhwc.shape
    if h < size or w < size:
        raise ValueError(f"patch FID crops {size} px tiles, but the images are {h}x{w}; lower the patch size "
                         f"or evaluate at a higher resolution")
    rows = np.linspace(0, h - size, math.ceil(h / size)).round().astype(int)
    cols = np.linspace(0, w - size, math.ceil(w / size)).round().astype(int)
    return np.concatenate([images_uint8_nhwc[:, r:r + size, c:c + size] for r in rows for c in cols])


def resize_images(images_uint8_nhwc: np.ndarray, resolution: int) -> np.ndarray:
    """PIL bicubic (antialiased) resize of every image to `resolution` px, as the DMD2 authors
    downscale 512 px samples for the 256 px COCO FID; unchanged when already that size."""
    from PIL import Image

    if images_uint8_nhwc.shape[1:3] == (resolution, resolution):
        return images_uint8_nhwc
    return np.stack([np.asarray(Image.fromarray(img).resize((resolution, resolution), Image.Resampling.BICUBIC))
                     for img in images_uint8_nhwc])


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _plain_image_files(path: Path, limit: int | None) -> list[Path] | None:
    """A plain folder's image files, sorted by name (the first `limit`); None for the other kinds
    of source (an image folder with metadata.jsonl, Parquet)."""
    from dmdscale.data.sources import METADATA_FILE, DataError

    if not path.is_dir() or (path / METADATA_FILE).exists() or any(path.glob("*.parquet")):
        return None
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)[:limit]
    if len(files) < 2:
        raise DataError(f"{path}: fewer than two image files ({', '.join(_IMAGE_SUFFIXES)})")
    return files


def _decode_files(files: Sequence[Path], resolution: int) -> list[np.ndarray | None]:
    """Each file decoded to uint8 RGB at `resolution`, or None when it cannot be read or decoded."""
    from dmdscale.data.sources import decode_image

    out = []
    for f in files:
        try:
            data = f.read_bytes()
        except OSError:
            data = None
        out.append(decode_image(data, resolution, 3))
    return out


def check_real_images(source: str | os.PathLike, resolution: int, limit: int | None = None,
                      sample: int = 32) -> None:
    """Fail in seconds, before any generation, on real images that cannot be read: the source
    must exist and be a known kind (a plain image folder, an image folder with metadata.jsonl,
    Parquet with an image column), and at least one of its first `sample` images must decode.
    A DataError (or FileNotFoundError) naming the path; the rest is read by `real_image_chunks`."""
    from dmdscale.data.sources import DataError, _describe, _image_bytes, _read_metadata, decode_image

    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no real images at {path}")
    files = _plain_image_files(path, limit)
    if files is not None:
        decoded = _decode_files(files[:sample], resolution)
    else:
        described = _describe(path, require_labels=False)
        if described.kind == "imagefolder":
            rows = _read_metadata(Path(described.files[0])).slice(0, sample).to_pydict()
        else:
            import pyarrow.parquet as pq

            batch = next(pq.ParquetFile(described.files[0]).iter_batches(batch_size=sample, columns=["image"]), None)
            rows = batch.to_pydict() if batch is not None else {"image": []}
        decoded = [decode_image(data, resolution, 3) for data in _image_bytes(described, rows)]
    if not any(d is not None for d in decoded):
        raise DataError(f"{path}: none of its first {len(decoded)} images can be read and decoded "
                        f"(give a folder of image files, an image folder with metadata.jsonl, or Parquet with "
                        f"an image column)")


def real_image_chunks(source: str | os.PathLike, resolution: int, limit: int | None = None,
                      chunk: int = 500, on_skipped: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
    """uint8 RGB images at `resolution`, in chunks, from a plain folder of image files (e.g.
    COCO's val2014/, sorted by name, decoded a chunk at a time so 40K images never sit in memory
    at once), an image folder with metadata.jsonl, or Parquet with an `image` column (read at once).
    Images that cannot be read or decoded are left out; `on_skipped(n)` hears how many, per chunk
    (a chunk may then be empty)."""
    from dmdscale.data.sources import load_arrays

    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--real: no images at {path}")
    files = _plain_image_files(path, limit)
    if files is not None:
        for i in range(0, len(files), chunk):
            decoded = _decode_files(files[i:i + chunk], resolution)
            good = [d for d in decoded if d is not None]
            if on_skipped is not None and len(good) < len(decoded):
                on_skipped(len(decoded) - len(good))
            yield np.stack(good) if good else np.zeros((0, resolution, resolution, 3), np.uint8)
        return
    images, _, skipped = load_arrays(path, resolution, 3)
    if on_skipped is not None and skipped:
        on_skipped(skipped)
    images = images[:limit]
    for i in range(0, len(images), chunk):
        yield images[i:i + chunk]


def save_prompt_grid(images_uint8_nhwc: np.ndarray, prompts: Sequence[str], path: str | os.PathLike,
                     ncols: int = 4, title: str | None = None, chars: int = 28) -> Path:
    """A grid of samples, each captioned with (the start of) its prompt, wrapped."""
    import textwrap

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(images_uint8_nhwc)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(ncols * 2.2, nrows * 2.7 + (0.4 if title else 0)), dpi=100)
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < n:
            ax.imshow(images_uint8_nhwc[i], interpolation="nearest")
            caption = prompts[i] if len(prompts[i]) <= 2 * chars else prompts[i][:2 * chars - 3] + "..."
            ax.set_title("\n".join(textwrap.wrap(caption, chars)), fontsize=7, pad=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def pipeline_images(pipe: Any, prompts: list[str], resolution: int, seed: int, batch: int = 8, **call: Any) -> np.ndarray:
    """uint8 NHWC images from a diffusers text-to-image pipeline, in fixed-seed chunks: what the
    final evaluation, the checkpoint evaluation and the evaluate command sample a student with."""
    generator = torch.Generator().manual_seed(seed)
    images = [pipe(prompts[i:i + batch], height=resolution, width=resolution, generator=generator,
                   output_type="np", **call).images for i in range(0, len(prompts), batch)]
    return (np.concatenate(images) * 255).round().clip(0, 255).astype(np.uint8)
