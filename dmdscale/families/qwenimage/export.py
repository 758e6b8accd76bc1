"""The Qwen-Image student as a `QwenImagePipeline` folder stock diffusers loads (see `dmdscale.export`).

The sampler is a stock FlowMatchEulerDiscreteScheduler from `flow_student_scheduler`:
QwenImagePipeline, like FluxPipeline, passes its own linear sigmas (np.linspace(1, 1 / N, N)) for a
step count and shifts them by the resolution's mu, so the trained timesteps [999] and
[999, 749, 499, 249] come from `num_inference_steps=N`. Guidance: the pipeline runs a second
(negative) pass only when a negative prompt is given and true_cfg_scale > 1, and its true_cfg_scale
defaults to 4.0; the call records true_cfg_scale=1.0, so the guidance-distilled student runs one pass
even when a user adds the model card's negative_prompt=" ", and the pipeline does not warn on every
call that 4.0 goes unused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dmdscale.export import flow_student_scheduler, save_fp16_variant, save_lora, scrub_folder, write_student_info
from dmdscale.families.qwenimage.model import FAMILY, check_qwen_folder, image_seq_len, vae_scale_factor

# What the student's call adds so the pipeline never runs true CFG around it.
GUIDANCE_OFF = {"true_cfg_scale": 1.0}


def student_pipeline(teacher: str | os.PathLike, timesteps: list[int], resolution: int,
                     transformer: torch.nn.Module | None = None) -> tuple[Any, dict[str, Any]]:
    """(the teacher's QwenImagePipeline with the student's scheduler, and `transformer` in place of the
    teacher's when given; the call that samples exactly the trained `timesteps` at `resolution` px)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    source = check_qwen_folder(teacher)
    seq_len = image_seq_len(resolution, vae_scale_factor(AutoencoderKLQwenImage.load_config(source, subfolder="vae")))
    scheduler, call = flow_student_scheduler(FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler"),
                                             timesteps, seq_len, pipeline_spaces_sigmas=True, guidance_off=GUIDANCE_OFF)
    parts: dict[str, Any] = {"scheduler": scheduler} | ({"transformer": transformer} if transformer is not None else {})
    return QwenImagePipeline.from_pretrained(source, **parts), call


def export_qwen_pipeline(teacher: str | os.PathLike, student_transformer: Any, timesteps: list[int],
                         out_dir: str | os.PathLike, resolution: int,
                         lora_state_dict: dict[str, torch.Tensor] | None = None, lora_config: Any = None,
                         fp16_variant: bool = False) -> Path:
    """Write a Qwen-Image student as a pipeline folder: the teacher's components, the trained
    transformer, the student's scheduler (for `resolution` px) and dmdscale.json. Loads with stock
    diffusers: `DiffusionPipeline.from_pretrained(out_dir)(prompt, **call)`, call as dmdscale.json
    records it. `student_transformer`: the trained transformer (LoRA merged) or a folder its
    save_pretrained wrote. With `lora_state_dict` and `lora_config`, also out_dir/lora/ for the
    teacher pipeline's `load_lora_weights` (peft keys, transformer prefix)."""
    from diffusers import QwenImageTransformer2DModel

    if (lora_state_dict is None) != (lora_config is None):
        raise ValueError("pass lora_state_dict and lora_config together (the config carries lora_alpha and r)")
    if isinstance(student_transformer, (str, os.PathLike)):
        student_transformer = QwenImageTransformer2DModel.from_pretrained(os.fspath(student_transformer))
    pipe, call = student_pipeline(teacher, timesteps, resolution, student_transformer)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    if fp16_variant:
        save_fp16_variant(out)
    write_student_info(out, timesteps, call, FAMILY, 1.0, resolution)
    if lora_state_dict is not None:
        save_lora(type(pipe), out, lora_state_dict, lora_config, component="transformer")
    scrub_folder(out)
    return out
