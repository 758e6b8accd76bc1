"""sd15 and sdxl: Stable Diffusion latent UNet teachers (a diffusers pipeline folder or hub id).

Data: images with captions, encoded into VAE latents and text embeddings on a Ray Data actor
pool (or streamed from `data.latent_cache`). Optional LoRA on the generator. The student is
exported as a whole diffusers pipeline around the trained UNet; the evaluation samples it as a
user loads it, against the teacher at its many-step CFG sampler (FID where clean-fid's
Inception weights are on disk).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmdscale.config import Config
from dmdscale.families.base import Evaluation, Family, RunInputs, Trained, check_teacher_steps

STUDENT_UNET_DIR = "student_unet"  # the final checkpoint's UNet; finish_student builds the pipeline around it
STUDENT_LORA = "student_lora.safetensors"
# The k-NN metrics (k up to 5) need more images than neighbours on each side.
QUALITY_MIN_IMAGES = 8


@dataclasses.dataclass
class Inputs(RunInputs):
    prompts: list[str] = dataclasses.field(default_factory=list)  # held-out captions to sample


def lora_config(cfg: Config) -> Any:
    """The generator's peft LoraConfig (B starts at zero, so the student starts as the teacher)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.targets,
                      init_lora_weights="gaussian")


def _generate(pipe: Any, prompts: list[str], resolution: int, seed: int, batch: int = 8, **call: Any) -> np.ndarray:
    """uint8 NHWC images from a diffusers pipeline, in fixed-seed chunks."""
    generator = torch.Generator().manual_seed(seed)
    images = [pipe(prompts[i:i + batch], height=resolution, width=resolution, generator=generator,
                   output_type="np", **call).images for i in range(0, len(prompts), batch)]
    return (np.concatenate(images) * 255).round().clip(0, 255).astype(np.uint8)


class SDFamily(Family):
    """One Stable Diffusion variant (`dmdscale.models.sd.SD_VARIANTS`) as a family."""

    student_parts = (STUDENT_UNET_DIR, STUDENT_LORA)
    pipeline_tag = "text-to-image"
    supports_lora = True

    def __init__(self, variant: str):
        self.name = self.run_label = variant

    def check_config(self, cfg: Config) -> None:
        if cfg.model.teacher in ("analytic", "train"):
            raise ValueError(f"model.teacher: a {self.name} teacher is a diffusers pipeline folder or hub id, "
                             f"got {cfg.model.teacher!r}")
        if cfg.data.channels != 3:
            raise ValueError(f"data.channels: {self.name} VAEs take RGB images, set 3 (got {cfg.data.channels})")

    def preflight(self, cfg: Config) -> Inputs:
        """The teacher folder's parts, images and captions in the data, the latent cache target."""
        from dmdscale.data.latents import check_cache_target
        from dmdscale.data.sources import check_source, load_prompts, source_paths
        from dmdscale.models.base import check_hub_teacher
        from dmdscale.models.sd import check_pipeline_folder

        teacher = check_pipeline_folder(cfg.model.teacher, self.name)
        check_hub_teacher(teacher)
        check_teacher_steps(cfg, teacher)
        train, held_out = source_paths(cfg)
        for path in {train, held_out}:
            check_source(path, require_labels=False, require_prompts=True)
        check_cache_target(cfg, train)
        return Inputs(train, held_out, cfg.model.teacher, load_prompts(held_out, cfg.eval.num_samples))

    def data_demands(self, cfg: Config) -> list[Any]:
        """The encoding actor pool (data.encode_actors, a GPU each with scale.use_gpu), unless the
        latents are already cached."""
        from dmdscale.data.latents import cache_key, cache_ready
        from dmdscale.data.sources import source_paths
        from dmdscale.distributed.cluster import Demand

        cache = cfg.data.latent_cache
        if cache is not None and cache_ready(Path(cache).expanduser(), cache_key(cfg, source_paths(cfg)[0])):
            return []
        per_actor = {"CPU": min(1.0, cfg.scale.data_cpus)} | ({"GPU": 1.0} if cfg.scale.use_gpu else {})
        return [Demand("latent encoding", {k: v * cfg.data.encode_actors for k, v in per_actor.items()},
                       "data.encode_actors, scale.use_gpu, scale.data_cpus")]

    def load_teacher(self, cfg: Config, teacher_path: str):
        """bf16 weights under bf16 mixed precision: a frozen network needs no fp32 copy."""
        from dmdscale.models.sd import load_sd_teacher

        dtype = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else torch.float32
        return load_sd_teacher(teacher_path, self.name, dtype)

    def adapt_generator(self, cfg: Config, generator) -> None:
        """With `lora.enabled` the generator's base weights stay frozen and only a peft LoRA
        adapter on its UNet trains."""
        if cfg.lora.enabled:
            generator.requires_grad_(False)
            generator.unet.add_adapter(lora_config(cfg))

    def save_student(self, cfg: Config, generator, folder: Path) -> None:
        """Only the UNet (LoRA merged) and the LoRA weights: `finish_student` assembles the
        pipeline around them from the teacher's own VAE and text encoders, which need not travel
        through checkpoint storage."""
        from safetensors.torch import save_file

        from dmdscale.export import lora_state_dict, merged_unet

        if cfg.lora.enabled:
            lora = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(generator.unet).items()}
            save_file(lora, str(folder / STUDENT_LORA))
            merged_unet(generator.unet).save_pretrained(folder / STUDENT_UNET_DIR)
        else:
            generator.unet.save_pretrained(folder / STUDENT_UNET_DIR)

    def train_data(self, cfg: Config, inputs: Inputs) -> tuple[Any, Any]:
        from dmdscale.data.latents import latent_dataset
        from dmdscale.data.sources import inspect_dataset, materialize_if_small

        res = cfg.data.resolution
        stats = inspect_dataset(inputs.train_path, res, 3)
        data = latent_dataset(cfg, inputs.train_path)
        if cfg.data.latent_cache is None:  # else it streams from the cache: encoding happened once
            # On GPUs the encoders must be done before the trainers take the GPUs they hold.
            mode = "always" if cfg.scale.use_gpu else cfg.data.materialize
            data = materialize_if_small(data, stats.usable, res, 3, mode)
        return data, stats

    def finish_student(self, cfg: Config, out: Path) -> Path:
        """The pipeline folder around the trained UNet (and LoRA weights), from the teacher's parts."""
        from safetensors.torch import load_file

        from dmdscale.export import STUDENT_DIR, export_pipeline

        lora = load_file(str(out / STUDENT_LORA)) if cfg.lora.enabled else None
        folder = export_pipeline(cfg.model.teacher, self.name, out / STUDENT_UNET_DIR,
                                 cfg.generator.timesteps, out / STUDENT_DIR, lora_state_dict=lora,
                                 lora_config=lora_config(cfg) if cfg.lora.enabled else None,
                                 fp16_variant=cfg.export.fp16_variant)
        shutil.rmtree(out / STUDENT_UNET_DIR)
        (out / STUDENT_LORA).unlink(missing_ok=True)
        return folder

    def usage(self, cfg: Config, call: dict[str, Any]) -> str:
        lora = ("\n# Or the teacher with the LoRA adapter (peft keys; STUDENT/lora_kohya holds kohya's):\n"
                f"# pipe = DiffusionPipeline.from_pretrained({str(cfg.model.teacher)!r})\n"
                "# pipe.load_lora_weights(\"STUDENT/lora\")\n") if cfg.lora.enabled else ""
        return f"""from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("STUDENT")  # variant="fp16", dtype=torch.float16 if exported
image = pipe("a photo of a cat", {", ".join(f"{k}={v}" for k, v in call.items())}).images[0]  # no CFG: built in
{lora}"""

    def evaluate(self, cfg: Config, inputs: Inputs, trained: Trained, workdir: Path) -> Evaluation:
        """Student samples from the exported folder exactly as a user loads it (stock diffusers,
        the call its model card gives), the teacher's at its many-step CFG sampler, the measured
        speedup, the label-free sample quality figures, and FID and KID where clean-fid's Inception
        weights are on disk (they cannot be downloaded offline)."""
        from diffusers import DiffusionPipeline

        from dmdscale.data.sources import load_arrays
        from dmdscale.eval.metrics import compute_fid_kid, inception_weights_path, sample_quality_of
        from dmdscale.export import STUDENT_INFO

        res, seed, prompts = cfg.data.resolution, cfg.train.seed, inputs.prompts
        real = load_arrays(inputs.held_out_path, res, 3)[0][:len(prompts)]
        # The driver's own GPU when it has one (`ray job submit --entrypoint-num-gpus 1`); at 1024 px
        # a CPU driver takes minutes per teacher image.
        device = "cuda" if torch.cuda.is_available() else "cpu"
        student = DiffusionPipeline.from_pretrained(str(trained.student)).to(device)
        teacher = DiffusionPipeline.from_pretrained(cfg.model.teacher).to(device)
        for pipe in (student, teacher):
            pipe.set_progress_bar_config(disable=True)
        teacher_call = {"num_inference_steps": cfg.eval.teacher_steps, "guidance_scale": cfg.loss.guidance_scale}
        timed, images = {}, {}
        student_call = json.loads((Path(trained.student) / STUDENT_INFO).read_text())["call"]  # as the card says
        for name, pipe, call in (("student", student, student_call), ("teacher", teacher, teacher_call)):
            t0 = time.perf_counter()
            images[name] = _generate(pipe, prompts, res, seed, **call)
            timed[name] = time.perf_counter() - t0
        metrics: dict[str, Any] = {"student_steps": len(cfg.generator.timesteps), "teacher_steps": cfg.eval.teacher_steps,
                                   "sampling_speedup": timed["teacher"] / timed["student"],
                                   "student_seconds_per_image": timed["student"] / len(prompts)}
        if len(real) >= QUALITY_MIN_IMAGES:  # label-free, in pixels: SWD, precision/recall, colour statistics
            for name in images:
                metrics |= sample_quality_of(name, real, images[name], seed=seed)
        if inception_weights_path().is_file() and len(real) >= 2:
            for name in images:
                metrics[f"fid_{name}"], metrics[f"kid_{name}"] = compute_fid_kid(images[name], real, "inception")
        else:
            metrics["fid_skipped"] = f"clean-fid Inception weights not at {inception_weights_path()}"
        return Evaluation(metrics, {"images": images["student"], "prompts": np.asarray(prompts)})

    def draw_samples(self, cfg: Config, samples: dict[str, np.ndarray], metrics: dict[str, Any],
                     path: Path) -> None:
        from dmdscale.eval.plots import save_grid

        save_grid(samples["images"][:64], None, path, ncols=8, scale=1.2,
                  title=f"{len(cfg.generator.timesteps)}-step {self.name} student")
