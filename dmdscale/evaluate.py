"""python -m dmdscale.evaluate: the text-to-image evaluation of an exported student.

    python -m dmdscale.evaluate --student runs/sd15/student --prompts coco2014_30k.txt \\
        --real /data/coco/val2014 --protocol sd15-coco30k --clip-model /models/clip-vit-g-14 \\
        --inception /models/inception-2015-12-05.pt --num-actors 8 --out runs/sd15/eval

Generates one image per prompt on a Ray actor pool (each actor loads the student pipeline
once, one GPU each when the cluster has GPUs) with the call its dmdscale.json gives, in
fixed-seed chunks (chunk i: seed + i, so the images do not depend on the number of actors),
and measures as the chunks arrive (memory stays bounded at 30K images):

- FID against the real images on clean-fid's Inception (or CLIP image features), at
  `--resolution` (the generated images are downscaled to it, bicubic, as the authors evaluate
  512 px SD1.5 samples at 256 px). The real images' statistics are computed once and cached
  as .npz under `--cache-dir`, keyed by (real source, resolution, extractor, patches); later
  runs (other students, other checkpoints) read only the .npz. `--reference-stats` uses a
  given .npz instead.
- CLIP score: 100 * max(cos, 0) between each image and its prompt (torchmetrics' definition).
- `--patch-fid`: FID on tiles at Inception's input size cut from the full resolution images.

Writes OUT/metrics.json and OUT/grid.png (the first 16 images with their prompts). Nothing is
downloaded: missing weights or data are an error naming the path to provide.
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

from dmdscale.errors import UserError

__all__ = ["PROTOCOLS", "Protocol", "EvaluationError", "evaluate", "main", "read_prompts"]


@dataclasses.dataclass(frozen=True)
class Protocol:
    resolution: int  # FID resolution (generated images are downscaled to it)
    num_samples: int  # prompts (the first ones of the prompt file)


# Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis" (DMD2,
# NeurIPS 2024), text-to-image evaluation: SD1.5 students on 30K COCO-2014 captions at 256 px,
# SDXL students on a 10K COCO-2014 subset at 512 px (with patch FID and CLIP score). The COCO
# captions and images are the user's to provide (README: "Evaluating text-to-image students").
PROTOCOLS = {
    "sd15-coco30k": Protocol(resolution=256, num_samples=30_000),
    "sdxl-coco10k": Protocol(resolution=512, num_samples=10_000),
}
GRID_IMAGES = 16
DEFAULT_CACHE = "~/.cache/dmdscale/reference_stats"


class EvaluationError(UserError, ValueError):
    """A bad argument or input file of the evaluation command; the message names it."""


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


def _fingerprint(source: Path) -> list[int]:
    """What tells a changed real source apart under the same path: sizes and modification times."""
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    stats = [f.stat() for f in files]
    return [len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]


class _Generator:
    """A generation actor: the exported student pipeline, loaded once."""

    def __init__(self, student: str, threads: int):
        import ray
        import torch
        from diffusers import DiffusionPipeline

        from dmdscale.export import STUDENT_INFO

        torch.set_num_threads(threads)
        gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        self.pipe = DiffusionPipeline.from_pretrained(student).to("cuda" if gpu else "cpu")
        self.pipe.set_progress_bar_config(disable=True)
        info = json.loads((Path(student) / STUDENT_INFO).read_text())
        self.call = info["call"]
        # The trained resolution where the export recorded it (sd3/flux), else the UNet's native one.
        self.resolution = int(info.get("resolution") or self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    def generate(self, prompts: list[str], seed: int) -> np.ndarray:
        from dmdscale.families.sd import _generate

        return _generate(self.pipe, prompts, self.resolution, seed, batch=len(prompts), **self.call)


def _check_student(student: Path) -> None:
    from dmdscale.export import STUDENT_INFO

    for name in ("model_index.json", STUDENT_INFO):
        if not (student / name).is_file():
            raise FileNotFoundError(f"--student: {student} has no {name}; give the student/ folder of a dmdscale run "
                                    f"(dmdscale.export.export_pipeline writes it)")


def evaluate(student: str | os.PathLike, prompts: str | os.PathLike, out: str | os.PathLike, *,
             protocol: str = "custom", resolution: int | None = None, num_samples: int | None = None,
             real: str | os.PathLike | None = None, reference_stats: str | os.PathLike | None = None,
             num_real: int | None = None, fid_features: str = "inception", inception: str | None = None,
             clip_model: str | None = None, patch_fid: bool = False, patch_size: int | None = None,
             num_actors: int = 1, actor_cpus: float = 1.0, batch_size: int = 8, seed: int = 0,
             cache_dir: str | os.PathLike = DEFAULT_CACHE) -> dict[str, Any]:
    """The whole evaluation (see the module docstring); returns metrics.json's figures."""
    import ray
    import torch
    from ray.util import ActorPool

    from dmdscale.distributed.cluster import connect
    from dmdscale.eval.metrics import image_features
    from dmdscale.eval.text import (
        INCEPTION_SIZE,
        check_clip_model,
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

    # -- every check before any work ------------------------------------------------------------
    if protocol != "custom":
        if protocol not in PROTOCOLS:
            raise EvaluationError(f"--protocol: unknown {protocol!r}; choose from custom, {', '.join(PROTOCOLS)}")
        preset = PROTOCOLS[protocol]
        resolution = resolution or preset.resolution
        num_samples = num_samples or preset.num_samples
    if resolution is None:
        raise EvaluationError("--resolution: a custom protocol needs the FID resolution")
    student, out = Path(student).expanduser(), Path(out).expanduser()
    _check_student(student)
    texts = read_prompts(prompts, num_samples)
    real_path = Path(real).expanduser() if real is not None else None
    if real_path is not None and not real_path.exists():
        raise FileNotFoundError(f"--real: no real images at {real_path}")
    if patch_fid and real_path is None:
        raise EvaluationError("--patch-fid: needs --real (the tiles are cut from the real images at full resolution)")
    if fid_features == "clip" and clip_model is None:
        raise EvaluationError("--fid-features clip: needs --clip-model")
    wants_fid = real_path is not None or reference_stats is not None
    if wants_fid and fid_features == "inception":
        inception_file(inception, "--inception")
    if clip_model is not None:
        check_clip_model(clip_model, "--clip-model")
    patch = patch_size or INCEPTION_SIZE

    # -- measuring tools, on the driver's GPU when it has one ----------------------------------
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip = load_clip(clip_model, "--clip-model", device) if clip_model is not None else None
    extractor = make_fid_features(fid_features, inception=inception, clip=clip).to(device) if wants_fid else None
    extractor_id = fid_features if fid_features == "inception" else f"clip:{clip.source}" if clip else None

    def stats_of(size: int, patches: bool) -> tuple[dict[str, np.ndarray], str, bool]:
        if reference_stats is not None and not patches:
            stats = read_stats(reference_stats, {"extractor": extractor_id, "patch_size": None})
            return stats, str(reference_stats), True
        key = {"source": str(real_path.resolve()), "fingerprint": _fingerprint(real_path), "resolution": size,
               "extractor": extractor_id, "patch_size": patch if patches else None, "num_real": num_real}

        def features() -> np.ndarray:
            return np.concatenate([image_features(regular_crops(c, patch) if patches else c, extractor)
                                   for c in real_image_chunks(real_path, size, num_real)])

        stats, path, cached = cached_stats(key, cache_dir, features)
        return stats, str(path), cached

    # -- generation on the actor pool, measured as chunks arrive ---------------------------------
    connect()
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    actor_cls = ray.remote(_Generator).options(num_cpus=actor_cpus, num_gpus=1 if use_gpu else 0,
                                               runtime_env={"env_vars": {"TQDM_DISABLE": "1"}})
    actors = [actor_cls.remote(str(student.resolve()), max(1, int(actor_cpus))) for _ in range(num_actors)]
    chunks = [(texts[i:i + batch_size], seed + k) for k, i in enumerate(range(0, len(texts), batch_size))]
    gen_feats, patch_feats, cosines, shown = [], [], [], []
    generated_resolution = None
    t0 = time.perf_counter()
    try:
        for (chunk_prompts, _), images in zip(chunks, ActorPool(actors).map(
                lambda a, c: a.generate.remote(*c), chunks)):
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
    finally:
        for actor in actors:
            ray.kill(actor)
    seconds = time.perf_counter() - t0

    metrics: dict[str, Any] = {
        "protocol": protocol, "student": str(student), "prompts": str(prompts), "num_samples": len(texts),
        "resolution": resolution, "generated_resolution": generated_resolution, "seed": seed,
        "num_actors": num_actors, "generation_seconds": seconds, "images_per_second": len(texts) / seconds}
    if extractor is not None:
        ref, ref_path, cached = stats_of(resolution, False)
        metrics |= {"fid": frechet_distance(feature_stats(np.concatenate(gen_feats)), ref),
                    "fid_features": extractor_id, "reference_stats": ref_path, "reference_stats_cached": cached}
    if patch_fid:
        ref, ref_path, cached = stats_of(generated_resolution, True)
        metrics |= {"patch_fid": frechet_distance(feature_stats(np.concatenate(patch_feats)), ref),
                    "patch_size": patch, "patch_reference_stats": ref_path}
    if clip is not None:
        metrics |= {"clip_score": float(100.0 * torch.cat(cosines).clamp(min=0).mean()), "clip_model": clip.source}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    title = ", ".join(f"{name} {metrics[key]:.2f}" for name, key in (("FID", "fid"), ("CLIP", "clip_score"))
                      if key in metrics)
    save_prompt_grid(np.stack(shown), texts[:len(shown)], out / "grid.png", title=title or None)
    return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m dmdscale.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="an exported student folder (a run's student/)")
    parser.add_argument("--prompts", required=True, help=".txt (one prompt a line) or Parquet with a prompt column")
    parser.add_argument("--out", required=True, help="folder for metrics.json and grid.png")
    parser.add_argument("--protocol", default="custom", choices=["custom", *PROTOCOLS],
                        help="preset resolution and number of prompts (the DMD2 paper's); explicit flags win")
    parser.add_argument("--resolution", type=int, help="FID resolution (custom: required)")
    parser.add_argument("--num-samples", type=int, help="the first N prompts (custom default: all)")
    parser.add_argument("--real", help="real images: a folder of image files, an image folder with "
                                       "metadata.jsonl, or Parquet with an image column")
    parser.add_argument("--reference-stats", help="a reference .npz this command wrote, instead of --real")
    parser.add_argument("--num-real", type=int, help="use the first N real images (default: all)")
    parser.add_argument("--fid-features", default="inception", choices=["inception", "clip"])
    parser.add_argument("--inception", help="clean-fid's inception-2015-12-05.pt (default: /tmp, where clean-fid "
                                            "keeps it)")
    parser.add_argument("--clip-model", help="a local transformers CLIPModel folder: CLIP score (and CLIP FID "
                                             "features)")
    parser.add_argument("--patch-fid", action="store_true", help="also FID on 299 px tiles of the full-size images")
    parser.add_argument("--patch-size", type=int, help="patch FID's tile size (default 299)")
    parser.add_argument("--num-actors", type=int, default=1, help="generation actors (one GPU each on GPU clusters)")
    parser.add_argument("--actor-cpus", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generation call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where reference statistics are cached")
    args = vars(parser.parse_args(argv))
    try:
        metrics = evaluate(**args)
    except (UserError, FileNotFoundError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
