"""The SD1.5/SDXL student as a pipeline folder stock diffusers loads (see `dmdscale.export`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import LCMScheduler, UNet2DConditionModel

from dmdscale.export import (
    guidance_free_unet,
    sampling_call,
    save_fp16_variant,
    save_lora,
    scrub_folder,
    student_scheduler,
    write_student_info,
)
from dmdscale.families.sd.model import check_pipeline_folder

def _student(student_unet: UNet2DConditionModel | str | os.PathLike) -> UNet2DConditionModel:
    if isinstance(student_unet, UNet2DConditionModel):
        return student_unet
    folder = Path(student_unet)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"student UNet folder {str(folder)!r} has no config.json "
                                "(expected what UNet2DConditionModel.save_pretrained writes)")
    return UNet2DConditionModel.from_pretrained(folder)


def student_pipeline(teacher: str | os.PathLike, family: str, timesteps: list[int],
                     unet: UNet2DConditionModel | None = None) -> tuple[Any, dict[str, Any]]:
    """(the teacher's pipeline with a stock LCMScheduler stepping as the student's sampler
    (`student_scheduler`) around `unet` (the teacher's own when None), the call that samples the
    trained timesteps (`sampling_call`)). What the export saves and the checkpoint evaluator samples."""
    from diffusers import DiffusionPipeline

    source = check_pipeline_folder(teacher, family)
    scheduler = student_scheduler(LCMScheduler.load_config(source, subfolder="scheduler"), timesteps)
    pipe = DiffusionPipeline.from_pretrained(source, scheduler=scheduler, **({"unet": unet} if unet is not None else {}))
    return pipe, sampling_call(timesteps, scheduler.config.num_train_timesteps)


def export_pipeline(teacher: str | os.PathLike, family: str, student_unet: UNet2DConditionModel | str | os.PathLike,
                    timesteps: list[int], out_dir: str | os.PathLike,
                    lora_state_dict: dict[str, torch.Tensor] | None = None, lora_config: Any = None,
                    fp16_variant: bool = False) -> Path:
    """Write the student as a pipeline folder: the teacher's components, the student UNet made
    guidance-free, a stock LCMScheduler for `timesteps` (`student_scheduler`), and
    dmdscale.json (timesteps, the sampling call, family). Loads with stock diffusers:
    `DiffusionPipeline.from_pretrained(out_dir)(prompt, **sampling_call(timesteps))`.

    `teacher`: the teacher pipeline (local folder or hub id). `student_unet`: the trained UNet or
    a folder UNet2DConditionModel.save_pretrained wrote; for a LoRA run, the merged UNet
    (`merged_unet`). With `lora_state_dict` (`lora_state_dict(unet)`) and `lora_config` (the
    adapter's LoraConfig, `unet.peft_config["default"]`, needed so `load_lora_weights` scales by
    lora_alpha / r), also writes the adapter for the teacher pipeline's `load_lora_weights`:
    out_dir/lora/ (peft keys) and out_dir/lora_kohya/ (kohya keys). `fp16_variant`: also
    fp16 weights, loaded with `from_pretrained(out_dir, variant="fp16", dtype=torch.float16)`.
    """
    if (lora_state_dict is None) != (lora_config is None):
        raise ValueError("pass lora_state_dict and lora_config together (the config carries lora_alpha and r)")
    pipe, call = student_pipeline(teacher, family, timesteps, guidance_free_unet(_student(student_unet)))
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    if fp16_variant:
        save_fp16_variant(out)
    write_student_info(out, timesteps, call, family)
    if lora_state_dict is not None:
        save_lora(type(pipe), out, lora_state_dict, lora_config)
    scrub_folder(out)
    return out
