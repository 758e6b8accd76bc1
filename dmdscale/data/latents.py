"""Latent data for the text-to-image families: VAE latents and text embeddings on a Ray Data
actor pool.

Images and captions stream from the source (decoded by `data.read_dataset`, corrupt rows skipped
there); each actor holds the family's latent and prompt encoders (`TextToImage.latent_encoder`,
`prompt_encoder`: the teacher's VAE and text encoder(s)) once and turns batches into rows
  latent (C, h, w) float32: the VAE posterior's mean, normalised as the teacher's pipeline
    un-normalises before decoding (`VaeLatents`: (mean - shift_factor) * scaling_factor;
    C = the VAE's latent_channels: 4 for SD1.5/SDXL, 16 for SD3/FLUX, unpacked);
  prompt_embeds (L, D) [, pooled_prompt_embeds (P,), or what else the family's prompt encoder
  returns, e.g. Qwen-Image's prompt_embeds_mask]: the image's own caption, as the GAN's
  real branch needs it and the generator is conditioned on it.
With `data.latent_cache`, the rows are written as Parquet once and read back afterwards.

Prompt-only data (`dmdscale.data.sources.is_prompt_only`) is encoded by the text encoder(s)
alone (`PromptOnlyEncoder`): its rows carry the text embeddings and, as `latent`, zeros of the
latent shape. They are a shape placeholder, never data: a 1-step student's input is pure noise
of that shape (a multi-step one's, its own backward simulation), and the family's preflight
refuses every setting that would read real latents (the GAN terms, noised real inputs).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmdscale.config import Config
from dmdscale.contracts import TextToImage
from dmdscale.data.sources import DataError

CACHE_MARKER = "_dmdscale_latents.json"
# The conditioning columns a prompt encoder may return (a mask for variable-length text, padded).
TEXT_COLUMNS = ("prompt_embeds", "pooled_prompt_embeds", "prompt_embeds_mask")


class VaeLatents:
    """images (B, 3, H, W) in [-1, 1] -> latents through a diffusers `AutoencoderKL` (the SD and
    flow families' VAE): the posterior's mean, (mean - shift_factor) * scaling_factor."""

    def __init__(self, teacher: str, device: torch.device | str = "cpu"):
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(teacher, subfolder="vae").to(device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # The posterior's mean, not a sample: a cached data set must not freeze one noise draw.
        latent = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.mean
        shift = self.vae.config.get("shift_factor") or 0.0
        return (latent.float() - shift) * self.vae.config.scaling_factor


def vae_latent_shape(teacher: str, resolution: int) -> tuple[int, int, int]:
    """(channels, h, w) of an `AutoencoderKL` teacher's latents at `resolution`: the VAE's latent
    channels (not the denoiser's input channels: FLUX's transformer takes 2x2-packed latents, 64
    channels), and the resolution over the VAE's downsampling factor. Reads only the VAE's config."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.load_config(teacher, subfolder="vae")
    size = resolution // 2 ** (len(vae["block_out_channels"]) - 1)
    return int(vae["latent_channels"]), size, size


def _device(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


class LatentEncoder:
    """map_batches callable: {"image": (B, 3, H, W) in [-1, 1], "prompt": str} -> latent rows,
    through the family's latent and prompt encoders (`TextToImage`)."""

    def __init__(self, family: TextToImage, teacher: str, use_gpu: bool = False):
        self.device = _device(use_gpu)
        self.latents = family.latent_encoder(teacher, self.device)
        self.text = family.prompt_encoder(teacher, self.device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = torch.as_tensor(np.asarray(batch["image"]), device=self.device)
        out = {"latent": self.latents(images).float().cpu().numpy()}
        cond = self.text.encode([str(p) for p in batch["prompt"]])
        return out | {k: v.float().cpu().numpy() for k, v in cond.items()}


class PromptOnlyEncoder:
    """map_batches callable for prompt-only data: {"prompt": str} -> text embeddings and a zero
    `latent` of the teacher's latent shape (a placeholder; see the module docstring)."""

    def __init__(self, family: TextToImage, teacher: str, resolution: int, use_gpu: bool = False):
        self.device = _device(use_gpu)
        self.text = family.prompt_encoder(teacher, self.device)
        self.shape = family.latent_shape(teacher, resolution)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch["prompt"]]
        cond = self.text.encode(prompts)
        out = {"latent": np.zeros((len(prompts), *self.shape), np.float32)}
        return out | {k: v.float().cpu().numpy() for k, v in cond.items()}


def cache_key(cfg: Config, train_path: str) -> dict[str, Any]:
    """What the cached latents depend on: the teacher, the data and the resolution."""
    return {"teacher": cfg.model.teacher, "family": cfg.model.family, "data": os.path.abspath(train_path),
            "resolution": cfg.data.resolution}


def latent_dataset(cfg: Config, family: TextToImage, train_path: str) -> "ray.data.Dataset":  # noqa: F821
    """The training rows: encoded on the actor pool with `family`'s encoders, or streamed from
    `data.latent_cache`."""
    import ray.data

    cache = cfg.data.latent_cache
    if cache is not None and cache_ready(Path(cache).expanduser(), cache_key(cfg, train_path)):
        return ray.data.read_parquet(str(Path(cache).expanduser()))
    ds = encode(cfg, family, train_path)
    if cache is None:
        return ds
    return write_cache(ds, Path(cache).expanduser(), cache_key(cfg, train_path))


def encode(cfg: Config, family: TextToImage, train_path: str) -> "ray.data.Dataset":  # noqa: F821
    """Images + captions -> latent rows on `data.encode_actors` actors (a GPU each with scale.use_gpu);
    prompts alone -> text rows with a placeholder latent (`PromptOnlyEncoder`)."""
    from dmdscale.data.sources import is_prompt_only, read_dataset, read_prompts

    if is_prompt_only(train_path):
        return read_prompts(train_path).map_batches(
            PromptOnlyEncoder, fn_constructor_kwargs={"family": family, "teacher": cfg.model.teacher,
                                                      "resolution": cfg.data.resolution, "use_gpu": cfg.scale.use_gpu},
            batch_size=cfg.data.encode_batch_size, batch_format="numpy", concurrency=cfg.data.encode_actors,
            num_gpus=1 if cfg.scale.use_gpu else 0, num_cpus=min(1.0, cfg.scale.data_cpus))
    pixels = read_dataset(train_path, cfg.data.resolution, 3, num_cpus=min(1.0, cfg.scale.data_cpus),
                          keep_prompts=True)
    return pixels.map_batches(
        LatentEncoder,
        fn_constructor_kwargs={"family": family, "teacher": cfg.model.teacher, "use_gpu": cfg.scale.use_gpu},
        batch_size=cfg.data.encode_batch_size, batch_format="numpy", concurrency=cfg.data.encode_actors,
        num_gpus=1 if cfg.scale.use_gpu else 0, num_cpus=min(1.0, cfg.scale.data_cpus))


def write_cache(ds: "ray.data.Dataset", folder: Path, key: dict[str, Any]) -> "ray.data.Dataset":  # noqa: F821
    """Write the encoded rows as Parquet, then the marker (so a half-written cache is never used)."""
    import ray.data

    shutil.rmtree(folder, ignore_errors=True)
    ds.write_parquet(str(folder))
    (folder / CACHE_MARKER).write_text(json.dumps(key | {"id": _key_id(key)}))
    return ray.data.read_parquet(str(folder))


def _key_id(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_ready(folder: Path, key: dict[str, Any]) -> bool:
    """True when `folder` holds finished latents for `key`; an error when it holds another's."""
    marker = folder / CACHE_MARKER
    if not marker.is_file():
        return False
    held = json.loads(marker.read_text())
    if held.get("id") != _key_id(key):
        changed = sorted(k for k in key if held.get(k) != key[k])
        raise DataError(f"data.latent_cache {str(folder)!r} holds latents of another run (differs in "
                        f"{', '.join(changed)}): remove it or point data.latent_cache elsewhere")
    return True


def check_cache_target(cfg: Config, train_path: str) -> None:
    """Before any cluster work: a cache folder that holds another run's latents is an error."""
    if cfg.data.latent_cache is not None:
        cache_ready(Path(cfg.data.latent_cache).expanduser(), cache_key(cfg, train_path))
