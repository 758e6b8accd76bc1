"""The pixel-UNet student as a diffusers folder (unet/ + scheduler/) stock diffusers samples (see `dmdscale.export`)."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from dmdscale.export import sampling_call, scrub_folder, student_scheduler, write_student_info

def export_unet_student(generator: Any, timesteps: list[int], out_dir: str | os.PathLike,
                        family: str = "unet2d", fp16_variant: bool = False) -> Path:
    """A pixel-space generator (`ClassConditionalUNet`) as a diffusers folder: unet/ + scheduler/
    (a stock LCMScheduler, `student_scheduler`) + dmdscale.json. Stock diffusers samples it with
    `UNet2DModel` and `LCMScheduler.set_timesteps(**sampling_call(timesteps))` (the loop is in
    the model card); the result equals `dmdscale.core.sampling.sample` on the same noise."""
    out = Path(out_dir)
    generator.unet.save_pretrained(out / "unet")
    if fp16_variant:
        copy.deepcopy(generator.unet).to(torch.float16).save_pretrained(out / "unet", variant="fp16")
    scheduler = student_scheduler(generator.schedule.scheduler_config, timesteps)
    scheduler.save_pretrained(out / "scheduler")
    write_student_info(out, timesteps, sampling_call(timesteps, scheduler.config.num_train_timesteps), family)
    scrub_folder(out)
    return out
