"""The distilled student as a diffusers folder, for every image family.

Pixel UNets (unet2d): `export_unet_student` writes unet/ + scheduler/ (LCMScheduler) +
dmdscale.json. Text-to-image (sd15, sdxl): `export_pipeline` writes a whole pipeline folder
that samples correctly with no arguments:

`DiffusionPipeline.from_pretrained(folder)(prompt)` must run the student's few trained steps
with no classifier-free guidance (the student was distilled from the CFG-guided teacher), but
stock SD/SDXL pipelines default to 50 steps and guidance 7.5/5.0. Two pieces fix that:

* Guidance off: every stock SD/SDXL pipeline skips CFG when `unet.config.time_cond_proj_dim` is
  set (how LCM-distilled UNets are packaged). The exported UNet has one, with an all-zero
  `time_embedding.cond_proj` (a bias-free Linear in diffusers 0.42), so the guidance embedding
  the pipeline feeds it adds exactly 0: outputs equal the trained UNet's for any guidance_scale.
* Steps: `DMD2Scheduler`, an `LCMScheduler` (whose step is the student's sampler: x0 from the
  UNet, re-noised to the next timestep) whose config records the trained timesteps and which uses
  them whatever `num_inference_steps` the pipeline asks for. diffusers resolves a non-diffusers
  component from `sys.modules` only, so the folder names it ["dmdscale", "DMD2Scheduler"] and
  the caller runs `import dmdscale` first. Without dmdscale, `LCMScheduler.from_pretrained(folder,
  subfolder="scheduler")` plus `timesteps=dmdscale.json["timesteps"]` samples the same.

LoRA runs also write diffusers-format LoRA weights (`lora/`) for the teacher pipeline's
`load_lora_weights`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from diffusers import LCMScheduler, SchedulerMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config

from dmdscale.core.schedule import config_for
from dmdscale.models.sd import check_pipeline_folder

__all__ = ["DMD2Scheduler", "SchedulerMixin", "guidance_free_unet", "merged_unet", "lora_state_dict",
           "export_pipeline", "export_unet_student", "STUDENT_DIR"]

logger = logging.getLogger(__name__)

GUIDANCE_EMBED_DIM = 256  # any width works: the projection reading it is all zeros
# LCM's boundary condition mixes the input into its x0: denoised = c_out * x0 + c_skip * x_t.
# The student predicts x0 outright, so take c_skip -> 0, c_out -> 1: with this scaling c_skip is
# < 3e-13 for every t >= 1 and c_out rounds to 1.0 in float32 (the default 10 leaves ~1e-7).
X0_TIMESTEP_SCALING = 1e6
STUDENT_DIR = "student"  # the exported student in a run folder
# What diffusers records for DMD2Scheduler (its module) and what it can resolve at load time.
SCHEDULER_ENTRY = ["dmdscale", "DMD2Scheduler"]


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence a logger's warnings for a moment (LCM warns about any schedule not starting at
    T-1, e.g. the one-step student's [399], which is right for a student trained on it)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


class DMD2Scheduler(LCMScheduler):
    """LCMScheduler that, unless given explicit `timesteps`, runs the student's trained ones.

    Pipelines call `set_timesteps(num_inference_steps)` with their own default (50), so the
    trained timesteps win over `num_inference_steps`; explicit `timesteps=` still defer to LCM.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", trained_betas: Any = None,
                 original_inference_steps: int = 1000, clip_sample: bool = False,
                 clip_sample_range: float = 1.0, set_alpha_to_one: bool = True, steps_offset: int = 0,
                 prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, sample_max_value: float = 1.0,
                 timestep_spacing: str = "leading", timestep_scaling: float = X0_TIMESTEP_SCALING,
                 rescale_betas_zero_snr: bool = False, trained_timesteps: list[int] | None = None):
        super().__init__(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas,
            original_inference_steps=original_inference_steps, clip_sample=clip_sample,
            clip_sample_range=clip_sample_range, set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset,
            prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing, timestep_scaling=timestep_scaling,
            rescale_betas_zero_snr=rescale_betas_zero_snr)
        self._told_steps = False  # the "num_inference_steps ignored" note is logged once

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      original_inference_steps: int | None = None, timesteps: list[int] | None = None,
                      strength: float = 1.0) -> None:
        trained = self.config.trained_timesteps
        if timesteps is not None or not trained:
            return super().set_timesteps(num_inference_steps, device, original_inference_steps, timesteps, strength)
        trained = [int(t) for t in trained]
        if num_inference_steps is not None and num_inference_steps != len(trained) and not self._told_steps:
            logger.info("DMD2Scheduler: this student was trained for timesteps %s; ignoring num_inference_steps=%d "
                        "(pass timesteps=[...] to override)", trained, num_inference_steps)
            self._told_steps = True
        with _quiet(LCMScheduler.__module__):
            super().set_timesteps(None, device, original_inference_steps, trained, strength)


def dmd2_scheduler(teacher_scheduler_config: dict[str, Any], timesteps: list[int]) -> DMD2Scheduler:
    """The teacher's noise schedule (betas, prediction_type, ...) stepping like the student's
    sampler: no clipping/thresholding, pure x0, every integer t on LCM's grid."""
    config = config_for(DMD2Scheduler, dict(teacher_scheduler_config))
    n = int(config.get("num_train_timesteps", 1000))
    config |= {"original_inference_steps": n, "clip_sample": False, "thresholding": False,
               "timestep_scaling": X0_TIMESTEP_SCALING, "trained_timesteps": [int(t) for t in timesteps]}
    scheduler = DMD2Scheduler.from_config(config)
    scheduler.set_timesteps()  # raises now, not at sampling time, for a schedule LCM rejects
    return scheduler


def guidance_free_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """`unet` with `time_cond_proj_dim` set and a zero `cond_proj`: pipelines then skip CFG and
    the guidance embedding they pass adds exactly 0. Shares all other weights with `unet`."""
    dim = unet.config.time_cond_proj_dim or GUIDANCE_EMBED_DIM
    with torch.device("meta"):  # no second random init of a multi-GB UNet
        out = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": dim})
    missing, unexpected = out.load_state_dict(unet.state_dict(), strict=False, assign=True)
    allowed = {"time_embedding.cond_proj.weight", "time_embedding.cond_proj.bias"}
    if set(missing) - allowed or unexpected:
        raise ValueError(f"the student UNet's weights do not fit its config (merge a LoRA first with "
                         f"merged_unet): missing {missing}, unexpected {unexpected[:5]}")
    proj = out.time_embedding.cond_proj
    like = unet.conv_in.weight
    for name, p in list(proj.named_parameters()):  # weight (and a bias, should a version add one)
        setattr(proj, name, torch.nn.Parameter(torch.zeros(p.shape, dtype=like.dtype, device=like.device),
                                               requires_grad=False))
    if any(t.is_meta for t in [*out.parameters(), *out.buffers()]):
        raise RuntimeError("guidance_free_unet left meta tensors: this diffusers UNet has state outside its state dict")
    return out.eval()


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The peft state dict of `unet`'s LoRA adapter (added with `unet.add_adapter`)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def merged_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A plain UNet (no peft layers) with `unet`'s LoRA merged into its weights, at the adapter's
    lora_alpha / r scale; `unet` itself is left untouched (a copy is merged)."""
    import copy

    out = copy.deepcopy(unet)
    out.fuse_lora()
    out.unload_lora()
    return out


def _student(student_unet: UNet2DConditionModel | str | os.PathLike) -> UNet2DConditionModel:
    if isinstance(student_unet, UNet2DConditionModel):
        return student_unet
    folder = Path(student_unet)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"student UNet folder {str(folder)!r} has no config.json "
                                "(expected what UNet2DConditionModel.save_pretrained writes)")
    return UNet2DConditionModel.from_pretrained(folder)


def _lora_metadata(config: Any) -> dict[str, Any]:
    """A LoraConfig (or its dict) as save_lora_weights' metadata: JSON-serialisable."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}


def export_pipeline(teacher: str | os.PathLike, family: str, student_unet: UNet2DConditionModel | str | os.PathLike,
                    timesteps: list[int], out_dir: str | os.PathLike,
                    lora_state_dict: dict[str, torch.Tensor] | None = None, lora_config: Any = None) -> Path:
    """Write the student as a pipeline folder: the teacher's components, the student UNet made
    guidance-free, a DMD2Scheduler for `timesteps`, and dmdscale.json (timesteps, guidance 1).

    `teacher`: the teacher pipeline (local folder or hub id). `student_unet`: the trained UNet or
    a folder UNet2DConditionModel.save_pretrained wrote; for a LoRA run, the merged UNet
    (`merged_unet`). With `lora_state_dict` (`lora_state_dict(unet)`) and `lora_config` (the
    adapter's LoraConfig, `unet.peft_config["default"]`, needed so `load_lora_weights` scales by
    lora_alpha / r), also writes out_dir/lora/ for the teacher pipeline's `load_lora_weights`.
    Load the result with `import dmdscale; DiffusionPipeline.from_pretrained(out_dir)`.
    """
    from diffusers import DiffusionPipeline

    if (lora_state_dict is None) != (lora_config is None):
        raise ValueError("pass lora_state_dict and lora_config together (the config carries lora_alpha and r)")
    source = check_pipeline_folder(teacher, family)
    unet = guidance_free_unet(_student(student_unet))
    scheduler = dmd2_scheduler(LCMScheduler.load_config(source, subfolder="scheduler"), timesteps)
    pipe = DiffusionPipeline.from_pretrained(source, unet=unet, scheduler=scheduler)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["scheduler"] = SCHEDULER_ENTRY  # diffusers writes the defining module, "dmdscale.export"
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (out / "dmdscale.json").write_text(json.dumps(
        {"timesteps": [int(t) for t in timesteps], "guidance_scale": 1.0, "family": family}, indent=2) + "\n")
    if lora_state_dict is not None:
        _save_lora(type(pipe), out / "lora", lora_state_dict, lora_config)
    return out


def _save_lora(pipeline_class: type, folder: Path, state_dict: dict[str, torch.Tensor], config: Any) -> None:
    import inspect

    # peft's own key format (lora_A / lora_B), which load_lora_weights reads as is. Not
    # convert_state_dict_to_diffusers: it rewrites attention keys only (to lora.down / lora.up),
    # and the loader then drops those from a dict that also holds conv / ff keys in peft format.
    kwargs: dict[str, Any] = {"unet_lora_layers": state_dict}
    if "unet_lora_adapter_metadata" in inspect.signature(pipeline_class.save_lora_weights).parameters:
        kwargs["unet_lora_adapter_metadata"] = _lora_metadata(config)
    else:  # older diffusers read no alpha back: right only when alpha == r
        meta = _lora_metadata(config)
        if meta.get("lora_alpha", meta.get("r")) != meta.get("r"):
            logger.warning("this diffusers cannot save lora_alpha: load_lora_weights will scale the LoRA by 1, "
                           "not lora_alpha / r")
    pipeline_class.save_lora_weights(folder, safe_serialization=True, **kwargs)


def export_unet_student(generator: Any, timesteps: list[int], out_dir: str | os.PathLike) -> Path:
    """A pixel-space generator (`ClassConditionalUNet`) as a diffusers folder: unet/ + scheduler/
    + dmdscale.json (its timesteps).

    The scheduler is diffusers' LCMScheduler, whose step is the student's sampler (x0 from the
    UNet's prediction, re-noised to the next timestep). With `original_inference_steps` 1000
    every timestep is on its grid, and `set_timesteps(timesteps=...)` reproduces
    `dmdscale.core.sampling.sample` (its boundary scalings are ~1e-7 from pure x0 at t >= 249).
    """
    out = Path(out_dir)
    generator.unet.save_pretrained(out / "unet")
    config = config_for(LCMScheduler, generator.schedule.scheduler_config) | {"original_inference_steps": 1000}
    LCMScheduler.from_config(config).save_pretrained(out / "scheduler")
    (out / "dmdscale.json").write_text(json.dumps({"timesteps": timesteps, "guidance_scale": 1.0}))
    return out
