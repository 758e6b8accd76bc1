"""Latent data for the text-to-image families on a real Ray Data actor pool, and its cache."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import text_cfg

from dmdscale.data.sources import DataError, build_digits_parquet
from dmdscale.distributed.worker import to_batch
from dmdscale.families import FAMILIES
from dmdscale.models.text_encoders import PromptEncoder


def test_latent_rows_on_a_ray_data_actor_pool_and_the_cache(ray_local, tmp_path, tiny):
    """Captioned images -> VAE latents (scaled) + text embeddings of each image's own caption,
    on an actor pool; a corrupt image is skipped; the Parquet cache is reused, and a cache of
    another teacher is refused by name."""
    from diffusers import AutoencoderKL

    from dmdscale.data.latents import latent_dataset

    paths = build_digits_parquet(tmp_path / "digits")
    table = pq.read_table(paths["test"]).slice(0, 12)
    images = table.column("image").to_pylist()
    images[5] = b"not an image"
    table = table.set_column(0, "image", pa.array(images, pa.binary()))
    pq.write_table(table, tmp_path / "small.parquet")
    cache = tmp_path / "cache"
    cfg = text_cfg("sdxl", tiny["sdxl"], **{"data.path": str(tmp_path / "small.parquet"),
                                            "data.latent_cache": str(cache), "data.encode_batch_size": 4})
    rows = latent_dataset(cfg, FAMILIES[cfg.model.family], cfg.data.path).take_all()
    assert len(rows) == 11  # the corrupt row is skipped
    assert (cache / "_dmdscale_latents.json").is_file()
    batch = to_batch({k: torch.as_tensor(np.stack([r[k] for r in rows])) for k in rows[0]})
    assert batch.images.shape == (11, 4, 16, 16)
    assert set(batch.cond) == {"prompt_embeds", "pooled_prompt_embeds"}

    # Row 0 is the table's first image: its latent and its own caption's embedding.
    from dmdscale.data.images import to_model_space
    from dmdscale.data.sources import decode_image

    vae = AutoencoderKL.from_pretrained(tiny["sdxl"], subfolder="vae")
    pixels = to_model_space(decode_image(images[0], 32, 3)[None])
    expected = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    latents = {tuple(np.round(r["latent"].ravel()[:4], 4)) for r in rows}
    assert tuple(np.round(expected.detach().numpy().ravel()[:4], 4)) in latents
    caption = table.column("prompt")[0].as_py()
    embed = PromptEncoder.load(tiny["sdxl"], "sdxl").encode([caption])["pooled_prompt_embeds"][0].numpy()
    assert any(np.allclose(r["pooled_prompt_embeds"], embed, atol=1e-5) for r in rows)

    # A second run streams the cache (the marker's id matches); another teacher is refused.
    marker = json.loads((cache / "_dmdscale_latents.json").read_text())
    assert len(latent_dataset(cfg, FAMILIES[cfg.model.family], cfg.data.path).take_all()) == 11
    assert json.loads((cache / "_dmdscale_latents.json").read_text()) == marker
    other = text_cfg("sd15", tiny["sd15"], **{"data.path": cfg.data.path, "data.latent_cache": str(cache)})
    with pytest.raises(DataError, match="data.latent_cache.*family.*teacher"):
        latent_dataset(other, FAMILIES[other.model.family], other.data.path)
