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
from dmdscale.contracts import Evaluation, RunInputs, Trained
from dmdscale.families.base import FamilyBase, check_teacher_steps

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


def check_prompt_only(cfg: Config, train_path: str) -> None:
    """Prompt-only data (no images) trains only where nothing reads a real image: the GAN terms
    and the noised-real-data input of the multi-step ablation are refused by name."""
    from dmdscale.config import ConfigError

    lc = cfg.loss
    if lc.gan_generator_weight > 0 or lc.gan_critic_weight > 0 or lc.gan_grad_ratio is not None:
        raise ConfigError(f"data.path: {train_path} holds prompts only, but the GAN term needs real images "
                          f"(loss.gan_generator_weight={lc.gan_generator_weight}, loss.gan_critic_weight="
                          f"{lc.gan_critic_weight}, loss.gan_grad_ratio={lc.gan_grad_ratio}); give images with "
                          f"captions, or set loss.gan_generator_weight=0 loss.gan_critic_weight=0 "
                          f"loss.gan_grad_ratio=null")
    if len(cfg.generator.timesteps) > 1 and not cfg.generator.backward_simulation:
        raise ConfigError(f"generator.backward_simulation: false trains on noised real latents, but data.path "
                          f"{train_path} holds prompts only; set generator.backward_simulation=true or give images")


def fid_kind(cfg: Config) -> str | None:
    """The text families' FID features: "inception" or "clip" as eval.feature_extractor says; its
    default ("classifier", the digits setting) means Inception where its weights are on disk,
    else no FID (the weights cannot be downloaded offline)."""
    from dmdscale.eval.text import inception_file

    if cfg.eval.feature_extractor != "classifier":
        return cfg.eval.feature_extractor
    return "inception" if inception_file(cfg.eval.inception_weights, must_exist=False).is_file() else None


def check_eval_models(cfg: Config) -> None:
    """The evaluation's weight files are there (nothing downloads): each error names the path."""
    from dmdscale.eval.text import check_clip_model, inception_file

    if cfg.eval.feature_extractor == "inception":
        inception_file(cfg.eval.inception_weights)
    if cfg.eval.clip_model is not None:
        check_clip_model(cfg.eval.clip_model)


def held_out_images(inputs: Inputs, resolution: int) -> np.ndarray:
    """The held-out images paired with the evaluation prompts (none for prompt-only data)."""
    from dmdscale.data.sources import is_prompt_only, load_arrays

    if is_prompt_only(inputs.held_out_path):
        return np.zeros((0, resolution, resolution, 3), np.uint8)
    return load_arrays(inputs.held_out_path, resolution, 3)[0][:len(inputs.prompts)]


class SDFamily(FamilyBase):
    """One Stable Diffusion variant (`dmdscale.families.sd.model.SD_VARIANTS`) as a family."""

    student_parts = (STUDENT_UNET_DIR, STUDENT_LORA)
    network = "unet"  # the generator's network: what LoRA adapts and the student exports
    network_dir = STUDENT_UNET_DIR  # where the final checkpoint holds it
    pipeline_tag = "text-to-image"
    supports_lora = True
    supports_regression_stage = True
    has_eval_actors = True  # eval.during_training: FID, CLIP score and a grid per checkpoint

    def __init__(self, variant: str):
        self.name = self.run_label = variant

    def check_config(self, cfg: Config) -> None:
        if cfg.model.teacher in ("analytic", "train"):
            raise ValueError(f"model.teacher: a {self.name} teacher is a diffusers pipeline folder or hub id, "
                             f"got {cfg.model.teacher!r}")
        if cfg.data.channels != 3:
            raise ValueError(f"data.channels: {self.name} VAEs take RGB images, set 3 (got {cfg.data.channels})")
        if cfg.regression.enabled and len(cfg.generator.timesteps) != 1:
            raise ValueError(f"regression.enabled: the regression stage trains a 1-step generator at "
                             f"generator.timesteps[0]; give one timestep (got {cfg.generator.timesteps})")
        self.check_head(cfg)

    def check_head(self, cfg: Config) -> None:
        """The discriminator options that fit this family's network."""
        if cfg.loss.gan_feature_depths:
            raise ValueError(f"loss.gan_feature_depths: transformer teachers only; {self.name}'s discriminator reads "
                             f"the UNet's mid block (leave it empty, choose the head with loss.gan_head)")

    def check_teacher_folder(self, teacher: str) -> str:
        """A local teacher folder holds this family's parts (a hub id passes through)."""
        from dmdscale.families.sd.model import check_pipeline_folder

        return check_pipeline_folder(teacher, self.name)

    def preflight(self, cfg: Config) -> Inputs:
        """The teacher folder's parts, images (or prompts alone, where the stage allows them) and
        captions in the data, the latent cache target."""
        from dmdscale.data.latents import check_cache_target
        from dmdscale.data.sources import check_source, is_prompt_only, load_prompts, source_paths
        from dmdscale.models.hub import check_hub_teacher

        teacher = self.check_teacher_folder(cfg.model.teacher)
        check_hub_teacher(teacher)
        check_teacher_steps(cfg, teacher)
        train, held_out = source_paths(cfg)
        for path in {train, held_out}:
            check_source(path, require_labels=False, require_prompts=True, allow_prompt_only=True)
        if is_prompt_only(train) and not cfg.regression.enabled:  # the regression stage reads prompts only
            check_prompt_only(cfg, train)
        check_cache_target(cfg, train)
        check_eval_models(cfg)
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
        """fp32 weights whatever train.mixed_precision says: generator and fake score are copied
        from them and train in fp32 under bf16 autocast (`build_players` stores the frozen
        teacher in bf16 after copying, as the DMD2 authors do)."""
        from dmdscale.families.sd.model import load_sd_teacher

        return load_sd_teacher(teacher_path, self.name, torch.float32)

    def adapt_generator(self, cfg: Config, generator) -> None:
        """With `lora.enabled` the generator's base weights stay frozen and only a peft LoRA
        adapter on its network (UNet or transformer) trains."""
        if cfg.lora.enabled:
            generator.requires_grad_(False)
            getattr(generator, self.network).add_adapter(lora_config(cfg))

    def save_student(self, cfg: Config, generator, folder: Path) -> None:
        """Only the network (LoRA merged) and the LoRA weights: `finish_student` assembles the
        pipeline around them from the teacher's own VAE and text encoders, which need not travel
        through checkpoint storage."""
        from safetensors.torch import save_file

        from dmdscale.export import lora_state_dict, merged_unet

        network = getattr(generator, self.network)
        if cfg.lora.enabled:
            lora = {k: v.detach().float().cpu().contiguous() for k, v in lora_state_dict(network).items()}
            save_file(lora, str(folder / STUDENT_LORA))
            merged_unet(network).save_pretrained(folder / self.network_dir)
        else:
            network.save_pretrained(folder / self.network_dir)

    def train_data(self, cfg: Config, inputs: Inputs) -> tuple[Any, Any]:
        from dmdscale.data.latents import latent_dataset
        from dmdscale.data.sources import (
            DatasetStats,
            count_prompts,
            inspect_dataset,
            is_prompt_only,
            materialize_if_small,
        )

        res = cfg.data.resolution
        if is_prompt_only(inputs.train_path):  # no images to decode: every prompt is a row
            stats = DatasetStats(usable=count_prompts(inputs.train_path), skipped=0, kind="prompts")
        else:
            stats = inspect_dataset(inputs.train_path, res, 3)
        data = latent_dataset(cfg, inputs.train_path)
        if cfg.data.latent_cache is None:  # else it streams from the cache: encoding happened once
            # On GPUs the encoders must be done before the trainers take the GPUs they hold.
            mode = "always" if cfg.scale.use_gpu else cfg.data.materialize
            data = materialize_if_small(data, stats.usable, res, 3, mode)
        return data, stats

    def finish_student(self, cfg: Config, out: Path) -> Path:
        """The pipeline folder around the trained network (and LoRA weights), from the teacher's parts."""
        from safetensors.torch import load_file

        from dmdscale.export import STUDENT_DIR

        lora = load_file(str(out / STUDENT_LORA)) if cfg.lora.enabled else None
        folder = self.export_student(cfg, out / self.network_dir, out / STUDENT_DIR, lora)
        shutil.rmtree(out / self.network_dir)
        (out / STUDENT_LORA).unlink(missing_ok=True)
        return folder

    def export_student(self, cfg: Config, network_dir: Path, student_dir: Path, lora: dict[str, Any] | None) -> Path:
        """The exported pipeline folder (`export_pipeline`: stock LCMScheduler, guidance off)."""
        from dmdscale.families.sd.export import export_pipeline

        return export_pipeline(cfg.model.teacher, self.name, network_dir, cfg.generator.timesteps, student_dir,
                               lora_state_dict=lora, lora_config=lora_config(cfg) if cfg.lora.enabled else None,
                               fp16_variant=cfg.export.fp16_variant)

    def usage(self, cfg: Config, call: dict[str, Any]) -> str:
        lora = ("\n# Or the teacher with the LoRA adapter (peft keys; STUDENT/lora_kohya holds kohya's):\n"
                f"# pipe = DiffusionPipeline.from_pretrained({str(cfg.model.teacher)!r})\n"
                "# pipe.load_lora_weights(\"STUDENT/lora\")\n") if cfg.lora.enabled else ""
        return f"""from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("STUDENT")  # variant="fp16", dtype=torch.float16 if exported
image = pipe("a photo of a cat", {", ".join(f"{k}={v}" for k, v in call.items())}).images[0]  # no CFG: built in
{lora}"""

    def start_eval_pool(self, cfg: Config, inputs: Inputs, tracker: Any) -> Any:
        """Checkpoint evaluation actors: each rebuilds the student pipeline around a checkpoint's
        UNet and measures it as `evaluate` measures the exported student (same prompts, seed,
        FID features and CLIP model), so the checkpoints and the final figures form one curve."""
        from dmdscale.distributed.evalpool import EvaluationPool, TextCheckpointEvaluator, text_eval_spec

        real = held_out_images(inputs, cfg.data.resolution)
        kind = fid_kind(cfg) if len(real) >= 2 else None
        return EvaluationPool.launch(cfg, TextCheckpointEvaluator, str(inputs.teacher_path), self.name,
                                     text_eval_spec(cfg, inputs.prompts), real, kind, cfg.eval.inception_weights,
                                     cfg.eval.clip_model, lora_config(cfg) if cfg.lora.enabled else None,
                                     tracker.tracking_uri, tracker.run_id)

    def evaluation_figures(self, cfg: Config) -> set[str]:
        from dmdscale.eval.metrics import sample_quality_names

        names = {"student_steps", "teacher_steps", "sampling_speedup", "student_seconds_per_image"}
        for who in ("student", "teacher"):  # FID and the quality figures need held-out images, CLIP a model
            names |= {f"fid_{who}", f"kid_{who}", f"clip_score_{who}"}
            names |= {f"{q}_{who}" for q in sample_quality_names(cfg.data.resolution, cfg.data.channels)}
        return names

    def evaluate(self, cfg: Config, inputs: Inputs, trained: Trained, workdir: Path) -> Evaluation:
        """Student samples from the exported folder exactly as a user loads it (stock diffusers,
        the call its model card gives), the teacher's at its many-step CFG sampler, the measured
        speedup, the label-free sample quality figures, FID and KID on `fid_kind`'s features
        (Inception only where its weights are on disk: they cannot be downloaded offline), and the
        CLIP score with eval.clip_model."""
        from diffusers import DiffusionPipeline

        from dmdscale.data.sources import is_prompt_only
        from dmdscale.eval.metrics import image_features, sample_quality_of
        from dmdscale.eval.text import clip_score, fid_features, fid_kid, inception_file, load_clip, pipeline_images
        from dmdscale.export import STUDENT_INFO

        res, seed, prompts = cfg.data.resolution, cfg.train.seed, inputs.prompts
        prompt_only = is_prompt_only(inputs.held_out_path)  # no held-out images: no real-image metrics
        real = held_out_images(inputs, res)
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
            images[name] = pipeline_images(pipe, prompts, res, seed, **call)
            timed[name] = time.perf_counter() - t0
        metrics: dict[str, Any] = {"student_steps": len(cfg.generator.timesteps), "teacher_steps": cfg.eval.teacher_steps,
                                   "sampling_speedup": timed["teacher"] / timed["student"],
                                   "student_seconds_per_image": timed["student"] / len(prompts)}
        if len(real) >= QUALITY_MIN_IMAGES:  # label-free, in pixels: SWD, precision/recall, colour statistics
            for name in images:
                metrics |= sample_quality_of(name, real, images[name], seed=seed)
        clip = load_clip(cfg.eval.clip_model, device=device) if cfg.eval.clip_model else None
        kind = fid_kind(cfg)
        if kind is not None and len(real) >= 2:  # the checkpoint evaluations' features and KID scaling
            extractor = fid_features(kind, inception=cfg.eval.inception_weights, clip=clip)
            real_features = image_features(real, extractor)
            for name in images:
                metrics[f"fid_{name}"], metrics[f"kid_{name}"] = fid_kid(image_features(images[name], extractor),
                                                                         real_features, kind)
            metrics["fid_feature_space"] = kind
        else:
            missing = inception_file(cfg.eval.inception_weights, must_exist=False)
            metrics["fid_skipped"] = (f"clean-fid Inception weights not at {missing} (set eval.inception_weights, "
                                      f"or eval.feature_extractor=clip with eval.clip_model)")
        if clip is not None:
            for name in images:
                metrics[f"clip_score_{name}"] = clip_score(images[name], prompts, clip)
        if prompt_only:
            metrics["fid_skipped"] = metrics["real_metrics_skipped"] = (
                f"{inputs.held_out_path} holds prompts only: FID, KID and the real-image quality figures "
                f"need held-out images with captions (data.eval_path)")
        return Evaluation(metrics, {"images": images["student"], "prompts": np.asarray(prompts)})

    def draw_samples(self, cfg: Config, samples: dict[str, np.ndarray], metrics: dict[str, Any],
                     path: Path) -> None:
        from dmdscale.eval.plots import save_grid

        save_grid(samples["images"][:64], None, path, ncols=8, scale=1.2,
                  title=f"{len(cfg.generator.timesteps)}-step {self.name} student")
