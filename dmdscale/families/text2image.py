"""What every text-to-image family shares (sd15, sdxl, sd3, flux, qwenimage): one base class.

Data: images with captions (or prompts alone) encoded into VAE latents and text embeddings on a
Ray Data actor pool, or streamed from `data.latent_cache`; the family says how its VAE and text
encoders turn them into rows (`latent_encoder`, `prompt_encoder`, `latent_shape`). Optional LoRA
on the generator's network. The student is exported as the teacher's own pipeline class with a
stock scheduler stepping as the student's sampler (`student_pipeline`); the checkpoint evaluator
(`TextCheckpointEvaluator`, on actors while training) and the final evaluation sample that same
pipeline, so the checkpoints and the final figures form one curve.

A family subclasses `TextToImageFamily` and gives its network (`network`: the pipeline
component the generator trains, e.g. "unet", "transformer"), its teacher loader, its folder
check, its encoders, its student pipeline and its model-card usage.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from dmdscale.config import Config
from dmdscale.contracts import Evaluation, RunInputs, Trained
from dmdscale.families.base import FamilyBase, check_teacher_steps

if TYPE_CHECKING:
    from dmdscale.core.networks import Denoiser

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


def text_eval_spec(cfg: Config, prompts: list[str]) -> dict[str, Any]:
    """What the final evaluation samples the student with: the held-out prompts, resolution, seed
    and trained timesteps, so a checkpoint's figures and the final ones form one curve."""
    return {"prompts": list(prompts), "resolution": cfg.data.resolution, "seed": cfg.train.seed,
            "timesteps": list(cfg.generator.timesteps)}


class TextToImageFamily(FamilyBase):
    """A text-to-image teacher family (see the module docstring); subclasses set `network` and
    give the hooks marked "the family's" below."""

    network = "unet"  # the pipeline component the generator trains, LoRA adapts and the student exports
    # The discriminator reads transformer tokens at loss.gan_feature_depths (TokenHead); else a
    # UNet's mid block through the head loss.gan_head names.
    token_head = False
    pipeline_tag = "text-to-image"
    supports_lora = True
    supports_regression_stage = True
    has_eval_actors = True  # eval.during_training: FID, CLIP score and a grid per checkpoint

    def __init__(self, variant: str):
        self.name = self.run_label = variant

    @property
    def network_dir(self) -> str:
        """Where the final checkpoint holds the trained network (`finish_student` builds the
        pipeline around it)."""
        return f"student_{self.network}"

    @property
    def student_parts(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.network_dir, STUDENT_LORA)

    # -- the family's ------------------------------------------------------------------------
    def check_teacher_folder(self, teacher: str) -> str:
        """A local teacher folder holds this family's parts (a hub id passes through)."""
        raise NotImplementedError

    def check_head(self, cfg: Config) -> None:
        """The discriminator options that fit this network, or a ValueError naming the key."""
        if self.token_head and cfg.loss.gan_head != "conv":
            raise ValueError(f"loss.gan_head: {self.name}'s discriminator is a token head on transformer blocks "
                             f"(choose them with loss.gan_feature_depths); leave gan_head 'conv', got "
                             f"{cfg.loss.gan_head!r}")
        if not self.token_head and cfg.loss.gan_feature_depths:
            raise ValueError(f"loss.gan_feature_depths: transformer teachers only; {self.name}'s discriminator reads "
                             f"the UNet's mid block (leave it empty, choose the head with loss.gan_head)")

    def critic_head(self, cfg: Config, fake_score: Denoiser) -> torch.nn.Module:
        if not self.token_head:
            return super().critic_head(cfg, fake_score)
        from dmdscale.models.heads import TokenHead

        return TokenHead.for_model(fake_score)

    def check_resolution(self, cfg: Config, teacher: str) -> None:
        """Raise ValueError naming data.resolution where the teacher cannot take it."""

    def prompt_encoder(self, teacher: str, device: torch.device | str) -> Any:
        """The teacher's frozen text encoder(s): `.encode(prompts) -> {name: (B, ...) tensor}`, the
        conditioning the network reads (fixed shapes per row, so rows of any batch stack)."""
        from dmdscale.models.text_encoders import PromptEncoder

        return PromptEncoder.load(teacher, self.name, device)

    def latent_encoder(self, teacher: str, device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor]:
        """images (B, 3, H, W) in [-1, 1] -> the latents the network denoises (B, C, h, w)."""
        from dmdscale.data.latents import VaeLatents

        return VaeLatents(teacher, device)

    def latent_shape(self, teacher: str, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the teacher's latents at `resolution`, from its config files alone."""
        from dmdscale.data.latents import vae_latent_shape

        return vae_latent_shape(teacher, resolution)

    def student_pipeline(self, cfg: Config, teacher: str, network: torch.nn.Module | None = None,
                         ) -> tuple[Any, dict[str, Any]]:
        """(the teacher's pipeline with a stock scheduler stepping as the student's sampler around
        `network` (the teacher's own when None), the call that samples the trained timesteps)."""
        raise NotImplementedError

    def exported_network(self, network: torch.nn.Module) -> torch.nn.Module:
        """The trained network as the exported pipeline holds it (SD: made guidance-free)."""
        return network

    # -- config and preflight ------------------------------------------------------------------
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

    def preflight(self, cfg: Config) -> Inputs:
        """The teacher folder's parts, images (or prompts alone, where the stage allows them) and
        captions in the data, the latent cache target, the evaluation's weight files."""
        from dmdscale.data.latents import check_cache_target
        from dmdscale.data.sources import check_source, is_prompt_only, load_prompts, source_paths
        from dmdscale.models.hub import check_hub_teacher, is_local

        teacher = self.check_teacher_folder(cfg.model.teacher)
        check_hub_teacher(teacher)
        check_teacher_steps(cfg, teacher)
        if is_local(teacher):  # a hub id's configs are read at load time
            self.check_resolution(cfg, teacher)
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

    # -- worker side ---------------------------------------------------------------------------
    def adapt_generator(self, cfg: Config, generator: Denoiser) -> None:
        """With `lora.enabled` the generator's base weights stay frozen and only a peft LoRA
        adapter on its network trains."""
        if cfg.lora.enabled:
            generator.requires_grad_(False)
            getattr(generator, self.network).add_adapter(lora_config(cfg))

    def save_student(self, cfg: Config, generator: Denoiser, folder: Path) -> None:
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

    # -- driver side ---------------------------------------------------------------------------
    def train_data(self, cfg: Config, inputs: Inputs) -> tuple[Any, Any]:
        from dmdscale.data.latents import latent_dataset
        from dmdscale.data.sources import inspect_dataset, kept_decoded

        res = cfg.data.resolution
        if cfg.data.latent_cache is not None:  # it streams from the cache: encoding happens once
            stats = inspect_dataset(inputs.train_path, res, 3)
            return latent_dataset(cfg, self, inputs.train_path), stats
        data = latent_dataset(cfg, self, inputs.train_path)
        # On GPUs the encoders must be done before the trainers take the GPUs they hold.
        return kept_decoded(data, inputs.train_path, res, 3, "always" if cfg.scale.use_gpu else cfg.data.materialize)

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
        """The family's: the exported pipeline folder around the trained network saved in
        `network_dir` (with LoRA weights `lora`), written by its export.py around `student_pipeline`."""
        raise NotImplementedError

    def start_eval_pool(self, cfg: Config, inputs: Inputs, tracker: Any) -> Any:
        """Checkpoint evaluation actors (`TextCheckpointEvaluator`): each rebuilds the student
        pipeline around a checkpoint's network and measures it as `evaluate` measures the
        exported student (same prompts, seed, FID features and CLIP model)."""
        from dmdscale.distributed.evalpool import EvaluationPool

        real = held_out_images(inputs, cfg.data.resolution)
        kind = fid_kind(cfg) if len(real) >= 2 else None
        return EvaluationPool.launch(cfg, TextCheckpointEvaluator, self, cfg.model_dump(), str(inputs.teacher_path),
                                     text_eval_spec(cfg, inputs.prompts), real, kind, tracker.tracking_uri,
                                     tracker.run_id)

    def evaluation_figures(self, cfg: Config) -> set[str]:
        from dmdscale.eval.metrics import sample_quality_names

        names = {"student_steps", "teacher_steps", "sampling_speedup", "student_seconds_per_image"}
        for who in ("student", "teacher"):  # FID and the quality figures need held-out images, CLIP a model
            names |= {f"fid_{who}", f"kid_{who}", f"clip_score_{who}"}
            names |= {f"{q}_{who}" for q in sample_quality_names(cfg.data.resolution, cfg.data.channels)}
        return names

    def usage(self, cfg: Config, call: dict[str, Any]) -> str:
        """Sampling the exported student at the trained resolution (a flow transformer's timestep
        shift depends on it) with the recorded call; guidance is distilled in."""
        lora = ("\n# Or the teacher with the LoRA adapter (peft keys):\n"
                f"# pipe = DiffusionPipeline.from_pretrained({str(cfg.model.teacher)!r})\n"
                "# pipe.load_lora_weights(\"STUDENT/lora\")\n") if cfg.lora.enabled else ""
        res, args = cfg.data.resolution, ", ".join(f"{k}={v}" for k, v in call.items())
        return f"""from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("STUDENT")  # variant="fp16", dtype=torch.float16 if exported
# At the trained resolution (the timestep shift depends on it); guidance is distilled in.
image = pipe("a photo of a cat", height={res}, width={res}, {args}).images[0]
{lora}"""

    def teacher_call(self, cfg: Config) -> dict[str, Any]:
        """The teacher pipeline's call for the final evaluation: its many-step CFG sampler."""
        return {"num_inference_steps": cfg.eval.teacher_steps, "guidance_scale": cfg.loss.guidance_scale}

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
        timed, images = {}, {}
        student_call = json.loads((Path(trained.student) / STUDENT_INFO).read_text())["call"]  # as the card says
        for name, pipe, call in (("student", student, student_call), ("teacher", teacher, self.teacher_call(cfg))):
            t0 = time.perf_counter()
            images[name] = pipeline_images(pipe, prompts, res, seed, **call)
            timed[name] = time.perf_counter() - t0
        metrics: dict[str, Any] = {"student_steps": len(cfg.generator.timesteps),
                                   "teacher_steps": cfg.eval.teacher_steps,
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


class TextCheckpointEvaluator:
    """A text family's checkpoint evaluation (what each evaluation actor runs; usable in-process):
    the family's student pipeline (`TextToImageFamily.student_pipeline`, as the export writes it)
    around each checkpoint's network, sampled as the final evaluation samples the exported
    student; FID and KID against held-out images (`fid_kind` "inception" or "clip"; None: none),
    CLIP score (with eval.clip_model), and a prompt-captioned grid.

    The submitted state_dict is the generator's (keys prefixed `<family.network>.`); with LoRA
    (lora.enabled) the adapter is added once and merged per evaluation.
    """

    def __init__(self, family: TextToImageFamily, cfg: dict[str, Any], teacher: str, spec: dict[str, Any],
                 real_images: np.ndarray, fid_kind: str | None, tracking_uri: str | None, run_id: str | None,
                 device: torch.device | str = "cpu"):
        from dmdscale.eval.metrics import image_features
        from dmdscale.eval.text import fid_features, load_clip
        from dmdscale.tracking import MlflowSink

        cfg_ = Config.model_validate(cfg)
        self.family, self.device = family, torch.device(device)
        self.spec, self.fid_kind, self.lora = spec, fid_kind, cfg_.lora.enabled
        self.pipe, self.call = family.student_pipeline(cfg_, teacher)
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.network = getattr(self.pipe, family.network)  # receives each checkpoint's weights
        if self.lora:
            self.network.add_adapter(lora_config(cfg_))
        clip_model = cfg_.eval.clip_model
        self.clip = load_clip(clip_model, device=self.device) if clip_model else None
        self.extractor = (fid_features(fid_kind, inception=cfg_.eval.inception_weights, clip=self.clip)
                          if fid_kind else None)
        # The held-out images' features once, not at every checkpoint.
        self.real_features = image_features(np.asarray(real_images), self.extractor) if self.extractor else None
        self.sink = MlflowSink(tracking_uri, run_id)  # its calls never raise

    def evaluate(self, step: int, state_dict: dict[str, torch.Tensor],
                 averages: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        """{step, fid_student, kid_student, clip_score_student (None where not computed),
        seconds}, `*_student_<name>` for each of `averages` (`dmdscale.eval.checkpoints`)."""
        from dmdscale.eval.checkpoints import evaluate_checkpoint
        from dmdscale.eval.text import save_prompt_grid

        def grid(images: np.ndarray, result: dict[str, Any]) -> Callable[[Path], Path]:
            shown = min(16, len(images))
            figures = ", ".join(f"{k.split('_')[0].upper()} {result[k]:.2f}"
                                for k in ("fid_student", "clip_score_student") if result[k] is not None)
            title = f"step {step}" + (f": {figures}" if figures else "")
            return lambda path: save_prompt_grid(images[:shown], self.spec["prompts"][:shown], path, title=title)

        return evaluate_checkpoint(self.sink, step, ("fid", "kid", "clip_score"), self._figures, state_dict,
                                   averages, grid)

    def _figures(self, who: str, state_dict: dict[str, torch.Tensor], result: dict[str, Any]) -> np.ndarray:
        from dmdscale.eval.metrics import image_features
        from dmdscale.eval.text import clip_score, fid_kid, pipeline_images
        from dmdscale.export import merged_unet

        prefix = f"{self.family.network}."
        self.network.load_state_dict({k.removeprefix(prefix): v for k, v in state_dict.items()})
        network = self.family.exported_network(merged_unet(self.network) if self.lora else self.network)
        self.pipe.register_modules(**{self.family.network: network})
        spec = self.spec
        images = pipeline_images(self.pipe, spec["prompts"], spec["resolution"], spec["seed"], **self.call)
        if self.extractor is not None:
            result[f"fid_{who}"], result[f"kid_{who}"] = fid_kid(image_features(images, self.extractor),
                                                                 self.real_features, self.fid_kind)
        if self.clip is not None:
            result[f"clip_score_{who}"] = clip_score(images, spec["prompts"], self.clip)
        return images
