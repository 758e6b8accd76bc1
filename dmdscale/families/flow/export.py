"""The SD3/FLUX student as a pipeline folder stock diffusers loads (see `dmdscale.export`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dmdscale.core.schedule import config_for
from dmdscale.export import save_lora, scrub_folder, write_student_info

def flow_student_scheduler(teacher_scheduler_config: dict[str, Any], timesteps: list[int], family: str,
                           image_seq_len: int) -> tuple[Any, dict[str, Any]]:
    """(a stock FlowMatchEulerDiscreteScheduler stepping like the student's sampler, the pipeline
    call that runs exactly the trained timesteps).

    The scheduler is the teacher's (shift, dynamic shifting) with `stochastic_sampling`: each step
    re-noises the model's x0 to the next sigma with fresh noise, which is the student's sampler
    (`dmdscale.core.sampling.sample`); its last step returns x0. The call is
    `num_inference_steps=N` where the pipeline's own spacing gives the trained sigmas (e.g. one step
    at t = 999, sigma 1; FLUX's 4 steps [999, 749, 499, 249]), else `sigmas=[...]`, the unshifted
    values the pipeline shifts onto them; checked here, not at sampling time. sd3 adds
    guidance_scale=1.0: its pipeline would otherwise run CFG at 7.0 around the guidance-distilled
    student; flux keeps the pipeline's default embedded guidance, which the student was trained at."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dmdscale.core.schedule import FlowMatchSchedule
    from dmdscale.models.variants import flow_variant

    variant = flow_variant(family)
    config = config_for(FlowMatchEulerDiscreteScheduler, dict(teacher_scheduler_config)) | {"stochastic_sampling": True}
    schedule = FlowMatchSchedule(config, image_seq_len)
    trained = schedule.flow_sigmas[torch.tensor(timesteps)].float()
    mu = {"mu": schedule.mu} if schedule.mu is not None else {}
    n = len(timesteps)

    def sigmas_for(**call: Any) -> torch.Tensor:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        if "sigmas" in call:
            scheduler.set_timesteps(sigmas=call["sigmas"], **mu)
        elif variant.pipeline_spaces_sigmas:  # FluxPipeline: its own linear sigmas for a step count
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), **mu)
        else:
            scheduler.set_timesteps(n, **mu)
        return scheduler.sigmas[:-1]

    call: dict[str, Any] = {"num_inference_steps": n}
    if not torch.allclose(sigmas_for(**call), trained, atol=1e-5):
        call = {"sigmas": [(int(t) + 1) / schedule.num_train_timesteps for t in timesteps]}
        if not torch.allclose(sigmas_for(**call), trained, atol=1e-5):
            raise ValueError(f"FlowMatchEulerDiscreteScheduler gives {sigmas_for(**call).tolist()} for {call}, "
                             f"not the trained sigmas {trained.tolist()}")
    if not variant.embedded_guidance:  # CFG pipelines: guidance off
        call["guidance_scale"] = 1.0
    return FlowMatchEulerDiscreteScheduler.from_config(config), call


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
    from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from dmdscale.families.flow.model import check_flow_folder, image_seq_len, transformer_class
    from dmdscale.families.flow.model import vae_scale_factor as scale_of
    from dmdscale.models.variants import FLUX_DEFAULT_GUIDANCE, flow_variant

    if (lora_state_dict is None) != (lora_config is None):
        raise ValueError("pass lora_state_dict and lora_config together (the config carries lora_alpha and r)")
    source = check_flow_folder(teacher, family)
    if isinstance(student_transformer, (str, os.PathLike)):
        student_transformer = transformer_class(family).from_pretrained(student_transformer)
    seq_len = image_seq_len(resolution, scale_of(AutoencoderKL.load_config(source, subfolder="vae")))
    scheduler, call = flow_student_scheduler(FlowMatchEulerDiscreteScheduler.load_config(source, subfolder="scheduler"),
                                             timesteps, family, seq_len)
    pipe = DiffusionPipeline.from_pretrained(source, transformer=student_transformer, scheduler=scheduler)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    if fp16_variant:
        pipe.to(torch.float16).save_pretrained(out, safe_serialization=True, variant="fp16")
    write_student_info(out, timesteps, call, family, FLUX_DEFAULT_GUIDANCE if flow_variant(family).embedded_guidance else 1.0,
                resolution)
    if lora_state_dict is not None:
        save_lora(type(pipe), out, lora_state_dict, lora_config, component="transformer")
    scrub_folder(out)
    return out
