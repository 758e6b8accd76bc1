"""python -m dmdscale.evaluate: the text-to-image evaluation of an exported student.

    python -m dmdscale.evaluate --student runs/sd15/student --prompts coco2014_30k.txt \\
        --real /data/coco/val2014 --protocol sd15-coco30k --clip-model /models/clip-vit-g-14 \\
        --inception /models/inception-2015-12-05.pt --num-actors 8 --out runs/sd15/eval

Generates one image per prompt on a Ray actor pool (`dmdscale.distributed.generation`: each
actor loads the student pipeline once, one GPU each when the cluster has GPUs) with the call its
dmdscale.json gives, in fixed-seed chunks (chunk i: seed + i, so the images do not depend on the
number of actors), and measures as the chunks arrive (memory stays bounded at 30K images):

- FID against the real images on clean-fid's Inception (or CLIP image features), at
  `--resolution` (the generated images are downscaled to it, bicubic, as the authors evaluate
  512 px SD1.5 samples at 256 px). The real images' statistics are computed once and cached
  as .npz under `--cache-dir`, keyed by (real source, resolution, extractor, patches:
  `dmdscale.eval.reference`); later
  runs (other students, other checkpoints) read only the .npz. `--reference-stats` uses a
  given .npz instead.
- CLIP score: 100 * max(cos, 0) between each image and its prompt (torchmetrics' definition).
- `--patch-fid`: FID on tiles at Inception's input size cut from the full resolution images.

Writes OUT/metrics.json and OUT/grid.png (the first 16 images with their prompts). Nothing is
downloaded: missing weights or data are an error naming the path to provide.

Everything that can fail is checked before the first image is generated, each failure one line
naming the flag or file (exit 2): the student, prompts, weights, a given `--reference-stats`
(readable, and measured with this extractor, patch setting and resolution), the real images
(the first ones decode), then, once on the cluster, whether it can ever hold `--num-actors`;
then the reference statistics are computed (or read from the cache), and only then does
generation start. Real images that cannot be decoded are left out, warned about and counted
(metrics.json's `real_images_skipped`). metrics.json and the .npz name no local path the tool
inferred: paths as given on the command line, and hashes of resolved paths in the cache key.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dmdscale.errors import EvaluationError, UserError, user_error_in, warn

__all__ = ["PROTOCOLS", "Protocol", "evaluate", "main", "read_prompts", "student_resolution"]


@dataclasses.dataclass(frozen=True)
class Protocol:
    resolution: int  # FID resolution (generated images are downscaled to it)
    num_samples: int  # prompts (the first ones of the prompt file)


# Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2,
# NeurIPS 2024), text-to-image evaluation: SD1.5 students on 30K COCO-2014 captions at 256 px,
# SDXL students on a 10K COCO-2014 subset at 512 px (with patch FID and CLIP score). The COCO
# captions and images are the user's to provide (docs/evaluation.md: "Evaluating text-to-image students").
PROTOCOLS = {
    "sd15-coco30k": Protocol(resolution=256, num_samples=30_000),
    "sdxl-coco10k": Protocol(resolution=512, num_samples=10_000),
}
GRID_IMAGES = 16
DEFAULT_CACHE = "~/.cache/dmdscale/reference_stats"
DEFAULT_RESOURCE_WAIT_S = 600.0  # training's scale.resource_wait_s default: an autoscaler's bounded wait


def read_prompts(path: str | os.PathLike, limit: int | None) -> list[str]:
    """Prompts from a .txt file (one per line, blank lines skipped) or from a `prompt` column
    (Parquet, or an image folder's metadata.jsonl `text`)."""
    from dmdscale.data.sources import load_prompts

    file = Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"--prompts: no prompt file at {file}")
    prompts = load_prompts(file, limit)  # .txt: its non-empty lines, stripped
    if limit is not None and len(prompts) < limit:
        raise EvaluationError(f"--prompts: {file} holds {len(prompts)} prompts, the evaluation needs {limit} "
                              f"(--num-samples or the protocol's)")
    if len(prompts) < 2:
        raise EvaluationError(f"--prompts: {file} holds {len(prompts)} prompts; FID needs at least 2")
    return prompts


def _shown(folder: str | os.PathLike, file: Path) -> str:
    """A file in a folder the user gave (or the default), spelled from the folder as given: no
    expanded ~, no absolute path the tool inferred."""
    return str(Path(folder) / file.name)


def _check_student(student: Path, given: str) -> dict[str, Any]:
    """The student's dmdscale.json, after checking that it is a text-to-image pipeline folder."""
    from dmdscale.export import STUDENT_INFO
    from dmdscale.families import FAMILIES

    if not student.is_dir():
        raise EvaluationError(f"--student: no folder at {given}; give the student/ folder of a dmdscale "
                              f"text-to-image run")
    if not (student / STUDENT_INFO).is_file():
        raise EvaluationError(f"--student: {given} has no {STUDENT_INFO}; give the student/ folder of a dmdscale "
                              f"run (dmdscale.families.sd.export.export_pipeline writes it)")
    try:
        info = json.loads((student / STUDENT_INFO).read_text())
        family = info["family"] if isinstance(info, dict) else None
    except (OSError, ValueError, KeyError) as exc:
        raise EvaluationError(f"--student: {given}/{STUDENT_INFO} is not readable JSON with a family "
                              f"({type(exc).__name__}: {exc})") from None
    text_to_image = sorted(n for n, f in FAMILIES.items() if f.pipeline_tag == "text-to-image")
    if family not in text_to_image:
        raise EvaluationError(f"--student: {given} is a dmdscale student of family {family!r} ({STUDENT_INFO}), "
                              f"which is not a text-to-image family; this command evaluates "
                              f"{', '.join(text_to_image)} students (a {family} run's own evaluation is in its "
                              f"metrics.json)")
    if not (student / "model_index.json").is_file():
        raise EvaluationError(f"--student: {given} has no model_index.json; give the student/ folder of a dmdscale "
                              f"{family} run (dmdscale.families.sd.export.export_pipeline writes it)")
    return info


def student_resolution(student: Path, info: dict[str, Any]) -> int | None:
    """The size of the images the student generates, read from its files without loading it:
    the trained resolution its dmdscale.json records (sd3/flux), else the UNet's sample size
    times the VAE's downscale factor (what diffusers' pipelines default to). None when the
    folder does not tell (then the generation actors do)."""
    if info.get("resolution"):
        return int(info["resolution"])
    try:
        unet = json.loads((student / "unet" / "config.json").read_text())
        vae = json.loads((student / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def evaluate(student: str | os.PathLike, prompts: str | os.PathLike, out: str | os.PathLike, *,
             protocol: str = "custom", resolution: int | None = None, num_samples: int | None = None,
             real: str | os.PathLike | None = None, reference_stats: str | os.PathLike | None = None,
             num_real: int | None = None, fid_features: str = "inception", inception: str | None = None,
             clip_model: str | None = None, patch_fid: bool = False, patch_size: int | None = None,
             num_actors: int = 1, actor_cpus: float = 1.0, batch_size: int = 8, seed: int = 0,
             cache_dir: str | os.PathLike = DEFAULT_CACHE,
             resource_wait_s: float = DEFAULT_RESOURCE_WAIT_S) -> dict[str, Any]:
    """The whole evaluation (see the module docstring); returns metrics.json's figures."""
    import ray
    import torch

    from dmdscale.distributed.cluster import connect
    from dmdscale.distributed.generation import ensure_actors_fit, generate_on_actors
    from dmdscale.eval.reference import fid_extractor_id, reference_key
    from dmdscale.eval.metrics import image_features
    from dmdscale.eval.text import (
        INCEPTION_SIZE,
        check_clip_model,
        check_real_images,
        clip_image_embeddings,
        clip_text_embeddings,
        feature_stats,
        frechet_distance,
        inception_file,
        load_clip,
        read_stats,
        real_image_chunks,
        regular_crops,
        resize_images,
        save_prompt_grid,
    )
    from dmdscale.eval.text import (
        fid_features as make_fid_features,
    )
    from dmdscale.eval.text import (
        reference_stats as cached_stats,
    )

    # -- every check before any work: files first (seconds, no cluster) ----------------------------
    if protocol != "custom":
        if protocol not in PROTOCOLS:
            raise EvaluationError(f"--protocol: unknown {protocol!r}; choose from custom, {', '.join(PROTOCOLS)}")
        preset = PROTOCOLS[protocol]
        resolution = resolution or preset.resolution
        num_samples = num_samples or preset.num_samples
    if resolution is None:
        raise EvaluationError("--resolution: a custom protocol needs the FID resolution")
    for flag, value, low in (("--resolution", resolution, 1), ("--num-samples", num_samples, 2),
                             ("--num-real", num_real, 2), ("--patch-size", patch_size, 1),
                             ("--num-actors", num_actors, 1), ("--batch-size", batch_size, 1)):
        if value is not None and value < low:
            raise EvaluationError(f"{flag}: must be at least {low}, got {value}")
    if not actor_cpus > 0:
        raise EvaluationError(f"--actor-cpus: must be more than 0, got {actor_cpus:g}")
    student_given, student, out = str(student), Path(student).expanduser(), Path(out).expanduser()
    info = _check_student(student, student_given)
    generated_resolution = student_resolution(student, info)  # None: known after the first chunk
    texts = read_prompts(prompts, num_samples)
    real_path = Path(real).expanduser() if real is not None else None
    if patch_fid and real_path is None:
        raise EvaluationError("--patch-fid: needs --real (the tiles are cut from the real images at full resolution)")
    patch = patch_size or INCEPTION_SIZE
    if patch_fid and generated_resolution is not None and generated_resolution < patch:
        raise EvaluationError(f"--patch-size: patch FID cuts {patch} px tiles, but {student_given} generates "
                              f"{generated_resolution} px images; give --patch-size {generated_resolution} or less")
    if real_path is not None:
        try:
            check_real_images(real_path, resolution, num_real)
        except (UserError, FileNotFoundError) as exc:
            raise EvaluationError(f"--real: {exc}") from None
    if fid_features == "clip" and clip_model is None:
        raise EvaluationError("--fid-features clip: needs --clip-model")
    wants_fid = real_path is not None or reference_stats is not None
    if wants_fid and fid_features == "inception":
        inception_file(inception, "--inception")
    if clip_model is not None:
        check_clip_model(clip_model, "--clip-model")
    extractor_id = fid_extractor_id(fid_features, clip_model) if wants_fid else None
    given_stats = None
    if reference_stats is not None:  # read now: a missing, corrupt or mismatched .npz fails in seconds
        given_stats = read_stats(reference_stats, {"extractor": extractor_id, "patch_size": None,
                                                   "resolution": resolution}, "--reference-stats")

    # -- the cluster: can it ever hold the generation actors? -----------------------------------
    connect()
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    ensure_actors_fit(num_actors, actor_cpus, use_gpu, resource_wait_s)

    # -- measuring tools, on the driver's GPU when it has one ----------------------------------
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip = load_clip(clip_model, "--clip-model", device) if clip_model is not None else None
    extractor = make_fid_features(fid_features, inception=inception, clip=clip).to(device) if wants_fid else None

    def stats_of(size: int, patches: bool) -> tuple[dict[str, np.ndarray], str, bool]:
        """Reference statistics of the real images at `size` (cached), before any generation."""
        if given_stats is not None and not patches:
            return given_stats, str(reference_stats), True
        key = reference_key(real_path, size, extractor_id, patch if patches else None, num_real)

        def features() -> tuple[np.ndarray, int]:
            skipped: list[int] = []
            feats = [image_features(regular_crops(c, patch) if patches else c, extractor)
                     for c in real_image_chunks(real_path, size, num_real, on_skipped=skipped.append) if len(c)]
            if sum(map(len, feats)) < 2:
                raise EvaluationError(f"--real: fewer than two of the images in {real} can be read and decoded "
                                      f"({sum(skipped)} could not)")
            return np.concatenate(feats), sum(skipped)

        stats, path, cached = cached_stats(key, cache_dir, features)
        skipped = int(stats.get("skipped", 0))
        if skipped and not warned:
            warned.append(skipped)
            warn(f"--real: {skipped} image(s) in {real} could not be read or decoded: left out of the reference "
                 f"statistics (counted in metrics.json as real_images_skipped)")
        return stats, _shown(cache_dir, path), cached

    warned: list[int] = []  # one warning for the unreadable real images, not one per statistics
    references = {}
    if extractor is not None:
        references["fid"] = stats_of(resolution, False)
    if patch_fid and generated_resolution is not None:
        references["patch_fid"] = stats_of(generated_resolution, True)

    # -- generation on the actor pool, measured as chunks arrive ---------------------------------
    gen_feats, patch_feats, cosines, shown = [], [], [], []
    t0 = time.perf_counter()
    for chunk_prompts, images in generate_on_actors(str(student.resolve()), texts, batch_size, seed, num_actors,
                                                    actor_cpus, use_gpu, generated_resolution):
        generated_resolution = images.shape[1]
        if len(shown) < GRID_IMAGES:
            shown.extend(images[:GRID_IMAGES - len(shown)])
        if extractor is not None:
            gen_feats.append(image_features(resize_images(images, resolution), extractor))
        if patch_fid:
            patch_feats.append(image_features(regular_crops(images, patch), extractor))
        if clip is not None:
            cosines.append(torch.nn.functional.cosine_similarity(
                clip_image_embeddings(images, clip), clip_text_embeddings(chunk_prompts, clip)))
    seconds = time.perf_counter() - t0

    # No absolute local path the tool inferred: names as given on the command line.
    metrics: dict[str, Any] = {
        "protocol": protocol, "student": student_given, "prompts": str(prompts), "num_samples": len(texts),
        "resolution": resolution, "generated_resolution": generated_resolution, "seed": seed,
        "num_actors": num_actors, "generation_seconds": seconds, "images_per_second": len(texts) / seconds}
    if real is not None:
        metrics["real"] = str(real)
    if extractor is not None:
        ref, ref_path, cached = references["fid"]
        metrics |= {"fid": frechet_distance(feature_stats(np.concatenate(gen_feats)), ref),
                    "fid_features": fid_features, "reference_stats": ref_path, "reference_stats_cached": cached,
                    "real_images_skipped": int(ref.get("skipped", 0))}
    if patch_fid:
        ref, ref_path, cached = references.get("patch_fid") or stats_of(generated_resolution, True)
        metrics |= {"patch_fid": frechet_distance(feature_stats(np.concatenate(patch_feats)), ref),
                    "patch_size": patch, "patch_reference_stats": ref_path,
                    "real_images_skipped": int(ref.get("skipped", 0))}
    if clip is not None:
        metrics |= {"clip_score": float(100.0 * torch.cat(cosines).clamp(min=0).mean()), "clip_model": str(clip_model)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    title = ", ".join(f"{name} {metrics[key]:.2f}" for name, key in (("FID", "fid"), ("CLIP", "clip_score"))
                      if key in metrics)
    save_prompt_grid(np.stack(shown), texts[:len(shown)], out / "grid.png", title=title or None)
    return metrics


def _at_least(low: int) -> Any:
    """An argparse type: an integer of at least `low` (argparse's one-line error otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m dmdscale.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="an exported student folder (a run's student/)")
    parser.add_argument("--prompts", required=True, help=".txt (one prompt a line) or Parquet with a prompt column")
    parser.add_argument("--out", required=True, help="folder for metrics.json and grid.png")
    parser.add_argument("--protocol", default="custom", choices=["custom", *PROTOCOLS],
                        help="preset resolution and number of prompts (the DMD2 paper's); explicit flags win")
    parser.add_argument("--resolution", type=_at_least(1), help="FID resolution (custom: required)")
    parser.add_argument("--num-samples", type=_at_least(2), help="the first N prompts (custom default: all)")
    parser.add_argument("--real", help="real images: a folder of image files, an image folder with "
                                       "metadata.jsonl, or Parquet with an image column")
    parser.add_argument("--reference-stats", help="a reference .npz this command wrote, instead of --real")
    parser.add_argument("--num-real", type=_at_least(2), help="use the first N real images (default: all)")
    parser.add_argument("--fid-features", default="inception", choices=["inception", "clip"])
    parser.add_argument("--inception", help="clean-fid's inception-2015-12-05.pt (default: /tmp, where clean-fid "
                                            "keeps it)")
    parser.add_argument("--clip-model", help="a local transformers CLIPModel folder: CLIP score (and CLIP FID "
                                             "features)")
    parser.add_argument("--patch-fid", action="store_true", help="also FID on 299 px tiles of the full-size images")
    parser.add_argument("--patch-size", type=_at_least(1), help="patch FID's tile size (default 299)")
    parser.add_argument("--num-actors", type=_at_least(1), default=1,
                        help="generation actors (one GPU each on GPU clusters); the cluster must hold them all")
    parser.add_argument("--actor-cpus", type=_positive_float, default=1.0)
    parser.add_argument("--batch-size", type=_at_least(1), default=8, help="prompts per generation call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where reference statistics are cached")
    parser.add_argument("--resource-wait-s", type=float, default=DEFAULT_RESOURCE_WAIT_S,
                        help="on a cluster joined by address (it may autoscale): how long to wait for room for "
                             "the generation actors (a cluster this command starts: none)")
    args = vars(parser.parse_args(argv))
    try:
        metrics = evaluate(**args)
    except Exception as exc:
        cause = user_error_in(exc) or (exc if isinstance(exc, FileNotFoundError) else None)
        if cause is None:
            raise
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(cause).split())}\n")
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
