"""The SD3/FLUX student as a pipeline folder stock diffusers loads (see `dmdscale.export`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dmdscale.export import flow_student_scheduler, save_fp16_variant, save_lora, scrub_folder, write_student_info

def flow_student_pipeline(teacher: str | os.PathLike, family: str, timesteps: list[int], resolution: int,
                          transformer: Any = None) -> tuple[Any, dict[str, Any]]:
    """(the teacher's pipeline with the student's scheduler (`flow_student_scheduler`, for
    `resolution` px) around `transformer` (the teacher's own when None), the call that samples
    the trained timesteps). What the export saves and the checkpoint evaluator samples."""
    from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from dmdscale.families.flow.model import check_flow_folder, image_seq_len
    from dmdscale.families.flow.model import vae_scale_factor as scale_of
    from dmdscale.models.variants import flow_variant

    source = check_flow_folder(teacher, family)
    seq_len = image_seq_len(resolution, scale_of(AutoencoderKL.load_config(source, subfolder="vae")))
    variant = flow_variant(family)
    scheduler, call = flow_student_scheduler(FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler"),
                                             timesteps, seq_len, pipeline_spaces_sigmas=variant.pipeline_spaces_sigmas,
                                             guidance_off=None if variant.embedded_guidance else {"guidance_scale": 1.0})
    parts = {"transformer": transformer} if transformer is not None else {}
    return DiffusionPipeline.from_pretrained(source, scheduler=scheduler, **parts), call


def export_flow_pipeline(teacher: str | os.PathLike, family: str, student_transformer: Any, timesteps: list[int],
                         out_dir: str | os.PathLike, resolution: int, lora_state_dict: dict[str, torch.Tensor] | None = None,
                         lora_config: Any = None, fp16_variant: bool = False) -> Path:
    """Write an sd3/flux student as a pipeline folder (`StableDiffusion3Pipeline` / `FluxPipeline`):
    the teacher's components, the trained transformer, the student's scheduler
    (`flow_student_scheduler`, for `resolution` px) and dmdscale.json. Loads with stock diffusers:
    `DiffusionPipeline.from_pretrained(out_dir)(prompt, **call)`, call as dmdscale.json records it.
    `student_transformer`: the trained transformer (LoRA merged) or a folder its save_pretrained
    wrote. With `lora_state_dict` and `lora_config`, also out_dir/lora/ for the teacher pipeline's
    `load_lora_weights` (peft keys, transformer prefix)."""
    from dmdscale.families.flow.model import transformer_class
    from dmdscale.models.variants import FLUX_DEFAULT_GUIDANCE, flow_variant

    if (lora_state_dict is None) != (lora_config is None):
        raise ValueError("pass lora_state_dict and lora_config together (the config carries lora_alpha and r)")
    if isinstance(student_transformer, (str, os.PathLike)):
        student_transformer = transformer_class(family).from_pretrained(student_transformer)
    pipe, call = flow_student_pipeline(teacher, family, timesteps, resolution, student_transformer)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    if fp16_variant:
        save_fp16_variant(out)
    guidance = FLUX_DEFAULT_GUIDANCE if flow_variant(family).embedded_guidance else 1.0
    write_student_info(out, timesteps, call, family, guidance, resolution)
    if lora_state_dict is not None:
        save_lora(type(pipe), out, lora_state_dict, lora_config, component="transformer")
    scrub_folder(out)
    return out
