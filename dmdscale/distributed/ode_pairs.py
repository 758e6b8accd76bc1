"""Teacher ODE pairs for the regression stage, made by a pool of Ray actors.

Pair i is (noise_i, the text embedding of prompt i mod #prompts, the teacher's deterministic
many-step DDIM output from noise_i with CFG). Pairs are grouped into shards of
`regression.shard_size`; shard s's noise is seeded by (train.seed, s) alone, so a shard is the
same whichever actor makes it and whenever. Each actor holds the teacher UNet and text
encoder(s) once and writes whole shards as Parquet (written, then renamed: a shard on disk is
complete). A rerun makes only the shards missing from the folder, so an interrupted generation
resumes; a folder holding another configuration's pairs is refused by name.

Shard columns: noise and target (C, h, w) float32 latents, prompt_embeds (L, D) [and
pooled_prompt_embeds (P,)] as Ray Data tensor columns, the prompt and the pair's index.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmdscale.config import Config
from dmdscale.contracts import TextToImage
from dmdscale.core.precision import autocast
from dmdscale.data.sources import DataError

PAIRS_MARKER = "_dmdscale_pairs.json"  # what the folder's pairs were made from
DEFAULT_DIR = "ode_pairs"  # under the run folder when regression.pairs_path is not set
PAIR_INFO_COLUMNS = ("prompt", "index")  # a shard's columns that are not tensors for training


def pairs_folder(cfg: Config, out: Path) -> Path:
    return Path(cfg.regression.pairs_path).expanduser() if cfg.regression.pairs_path else out / DEFAULT_DIR


def pairs_key(cfg: Config, prompts_path: str) -> dict[str, Any]:
    """Everything a shard's content depends on."""
    rc = cfg.regression
    return {"teacher": cfg.model.teacher, "family": cfg.model.family, "prompts": os.path.abspath(prompts_path),
            "resolution": cfg.data.resolution, "guidance_scale": cfg.loss.guidance_scale,
            "sampler_steps": rc.sampler_steps, "num_pairs": rc.num_pairs, "shard_size": rc.shard_size,
            "seed": cfg.train.seed}


def check_pairs_target(folder: Path, key: dict[str, Any]) -> None:
    """Before any cluster work: a folder whose pairs were made from something else is an error."""
    marker = folder / PAIRS_MARKER
    if marker.is_file():
        held = json.loads(marker.read_text())
        changed = sorted(k for k in key if held.get(k) != key[k])
        if changed:
            raise DataError(f"regression.pairs_path {str(folder)!r} holds pairs made with other settings (differ in "
                            f"{', '.join(changed)}): remove it or point regression.pairs_path elsewhere")


def shard_file(folder: Path, shard: int) -> Path:
    return folder / f"pairs-{shard:05d}.parquet"


def shard_ranges(num_pairs: int, shard_size: int) -> list[tuple[int, int, int]]:
    """(shard, first pair, end) for every shard."""
    return [(s, start, min(start + shard_size, num_pairs))
            for s, start in enumerate(range(0, num_pairs, shard_size))]


def missing_shards(folder: Path, num_pairs: int, shard_size: int) -> list[tuple[int, int, int]]:
    return [r for r in shard_ranges(num_pairs, shard_size) if not shard_file(folder, r[0]).is_file()]


class PairMaker:
    """A Ray actor: the teacher (with CFG) and its prompt encoder, writing whole shards."""

    def __init__(self, cfg: dict[str, Any], family: TextToImage, use_gpu: bool):
        self.cfg = cfg = Config.model_validate(cfg)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.teacher = family.load_teacher(cfg, cfg.model.teacher).to(self.device)
        self.text = family.prompt_encoder(cfg.model.teacher, self.device)
        self.shape = family.latent_shape(cfg.model.teacher, cfg.data.resolution)

    @torch.no_grad()
    def make(self, shard: int, start: int, prompts: list[str], folder: str) -> str:
        """Shard `shard` (pairs start .. start + len(prompts)) into `folder`; returns its path."""
        from dmdscale.core import seeds
        from dmdscale.core.sampling import teacher_sample
        from dmdscale.data.sources import _write_parquet_atomically

        rc, n = self.cfg.regression, len(prompts)
        generator = torch.Generator().manual_seed(seeds.ode_pair_noise(self.cfg.train.seed, shard))
        noise = torch.randn((n, *self.shape), generator=generator)  # on the CPU: the same on any device
        columns: dict[str, list[np.ndarray]] = {}
        for i in range(0, n, rc.sample_batch_size):
            cond = self.text.encode(prompts[i:i + rc.sample_batch_size])
            x = noise[i:i + rc.sample_batch_size].to(self.device)
            # A bf16 teacher computes in bf16; the sampler's state stays fp32.
            with autocast(self.device, self.cfg.train.mixed_precision):
                target = teacher_sample(self.teacher, x, rc.sampler_steps, cond, self.cfg.loss.guidance_scale)
            for name, value in {"noise": x, "target": target, **cond}.items():
                columns.setdefault(name, []).append(value.float().cpu().numpy())
        _write_parquet_atomically(_shard_table(columns, prompts, start), shard_file(Path(folder), shard))
        return str(shard_file(Path(folder), shard))


def _shard_table(columns: dict[str, list[np.ndarray]], prompts: list[str], start: int) -> Any:
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    table = {name: ArrowTensorArray.from_numpy(np.concatenate(parts)) for name, parts in columns.items()}
    return pa.table(table | {"prompt": pa.array(prompts, pa.string()),
                             "index": pa.array(np.arange(start, start + len(prompts), dtype=np.int64))})


def make_pairs(cfg: Config, family: TextToImage, prompts_path: str, folder: Path) -> dict[str, int]:
    """Write every missing shard of `folder` on `regression.num_actors` actors; returns
    {"pair_shards_written": ..., "pair_shards_reused": ...}."""
    import ray
    from ray.util import ActorPool

    from dmdscale.data.sources import load_prompts

    rc = cfg.regression
    key = pairs_key(cfg, prompts_path)
    check_pairs_target(folder, key)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PAIRS_MARKER).write_text(json.dumps(key, indent=1))
    todo = missing_shards(folder, rc.num_pairs, rc.shard_size)
    reused = len(shard_ranges(rc.num_pairs, rc.shard_size)) - len(todo)
    if todo:
        prompts = load_prompts(prompts_path)
        if not prompts:
            raise DataError(f"data.path: {prompts_path} holds no prompts")
        remote = ray.remote(num_cpus=rc.actor_cpus, num_gpus=rc.actor_gpus if cfg.scale.use_gpu else 0)(PairMaker)
        actors = [remote.remote(cfg.model_dump(), family, cfg.scale.use_gpu) for _ in range(min(rc.num_actors, len(todo)))]
        try:
            jobs = [(s, start, [prompts[i % len(prompts)] for i in range(start, end)]) for s, start, end in todo]
            for path in ActorPool(actors).map_unordered(
                    lambda actor, job: actor.make.remote(*job, str(folder)), jobs):
                print(f"dmdscale: wrote teacher ODE pairs {path}")
        finally:
            for actor in actors:  # the teachers' memory goes back before training starts
                ray.kill(actor)
    return {"pair_shards_written": len(todo), "pair_shards_reused": reused}
