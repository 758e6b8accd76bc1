"""Generation on a Ray actor pool for the evaluation command: each actor loads an exported
student pipeline once (a GPU each where the cluster has them) and samples prompt chunks with the
call its dmdscale.json records; chunk i is seeded seed + i, so the images do not depend on the
number of actors. `ensure_actors_fit` checks the cluster can ever hold the actors first."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from dmdscale.errors import EvaluationError


def ensure_actors_fit(num_actors: int, actor_cpus: float, use_gpu: bool, wait_s: float) -> None:
    """The generation actors can be placed on the cluster (Ray would otherwise wait forever for
    them): as `dmdscale.distributed.cluster.ensure_fits` checks a training run, an immediate error
    on a cluster this process started, a bounded wait (the autoscaler asked) on one joined by address."""
    import ray

    from dmdscale.distributed.cluster import _describe, _request, may_autoscale, missing

    need = {"CPU": num_actors * actor_cpus, **({"GPU": float(num_actors)} if use_gpu else {})}
    short = missing(need, ray.cluster_resources())
    if short and may_autoscale() and wait_s > 0:
        print(f"dmdscale: {num_actors} generation actors need {_describe(need)}; the cluster lacks {_describe(short)}. "
              f"Asking the autoscaler and waiting up to --resource-wait-s={wait_s:g} s", file=sys.stderr, flush=True)
        _request(need)
        deadline = time.monotonic() + wait_s
        while short and time.monotonic() < deadline:
            time.sleep(5.0)
            short = missing(need, ray.cluster_resources())
    if short:
        have = ray.cluster_resources()
        fits = int(have.get("CPU", 0.0) // actor_cpus) if actor_cpus > 0 else num_actors
        if use_gpu:
            fits = min(fits, int(have.get("GPU", 0.0)))
        each = f"{actor_cpus:g} CPU (--actor-cpus)" + (" and 1 GPU" if use_gpu else "")
        raise EvaluationError(
            f"--num-actors {num_actors}: the generation actors need {each} each, {_describe(need)} in all, but the "
            f"Ray cluster has {_describe({k: have.get(k, 0.0) for k in need})}; "
            + (f"at most {fits} fit: give --num-actors {fits} or fewer" if fits >= 1 else "lower --actor-cpus")
            + " (or run on a larger cluster)")


class PipelineGenerator:
    """A generation actor: the exported student pipeline, loaded once."""

    def __init__(self, student: str, threads: int, resolution: int | None = None):
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
        # The driver's `student_resolution` where it could tell; else the trained resolution where the
        # export recorded it (sd3/flux), else the UNet's native one.
        self.resolution = int(resolution or info.get("resolution")
                              or self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    def generate(self, prompts: list[str], seed: int) -> np.ndarray:
        from dmdscale.eval.text import pipeline_images

        return pipeline_images(self.pipe, prompts, self.resolution, seed, batch=len(prompts), **self.call)


def generate_on_actors(student: str, prompts: list[str], batch_size: int, seed: int, num_actors: int,
                       actor_cpus: float, use_gpu: bool,
                       resolution: int | None) -> Iterator[tuple[list[str], np.ndarray]]:
    """(prompts, images) per chunk of `batch_size` prompts, in order, from `num_actors`
    `PipelineGenerator` actors (killed when the iteration ends or fails)."""
    import ray
    from ray.util import ActorPool

    actor_cls = ray.remote(PipelineGenerator).options(num_cpus=actor_cpus, num_gpus=1 if use_gpu else 0,
                                                      runtime_env={"env_vars": {"TQDM_DISABLE": "1"}})
    actors = [actor_cls.remote(student, max(1, int(actor_cpus)), resolution) for _ in range(num_actors)]
    chunks = [(prompts[i:i + batch_size], seed + k) for k, i in enumerate(range(0, len(prompts), batch_size))]
    try:
        generated = ActorPool(actors).map(lambda a, c: a.generate.remote(*c), chunks)
        for (chunk_prompts, _), images in zip(chunks, generated):
            yield chunk_prompts, images
    finally:
        for actor in actors:
            ray.kill(actor)
