"""qwenimage: Qwen-Image, a flow-matching MMDiT (`QwenImageTransformer2DModel`, 20B) with a
Qwen2.5-VL text encoder and its own VAE (`AutoencoderKLQwenImage`), as diffusers'
`QwenImagePipeline` (a pipeline folder or hub id).

Everything a text-to-image family shares comes from `TextToImageFamily`
(`dmdscale.families.text2image`): the Ray Data encoding stage, LoRA, checkpoint evaluation on
actors, the final evaluation, the model card. What is Qwen-Image's, in this folder: the teacher
(`model.py`: `QwenImageDenoiser` on a dynamically shifted `FlowMatchSchedule`, true CFG against
the negative prompt " "), prompt encoding padded to a fixed length with a mask (`text.py`), the
normalised VAE latents (`model.py`), the student as a `QwenImagePipeline` folder (`export.py`),
the memory planner's profile (`memory.py`) and the tiny offline pipeline (`tiny.py`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dmdscale.config import Config
from dmdscale.families.qwenimage.memory import PROFILE
from dmdscale.families.text2image import TextToImageFamily, lora_config


class QwenImageFamily(TextToImageFamily):
    """Qwen-Image as a family (see the module docstring)."""

    network = "transformer"
    token_head = True
    memory_profile = PROFILE

    def __init__(self) -> None:
        super().__init__("qwenimage")

    def check_teacher_folder(self, teacher: str) -> str:
        from dmdscale.families.qwenimage.model import check_qwen_folder

        return check_qwen_folder(teacher)

    def check_resolution(self, cfg: Config, teacher: str) -> None:
        """A resolution the VAE's downsampling and the 2x2 token packing tile."""
        from diffusers import AutoencoderKLQwenImage

        from dmdscale.families.qwenimage.model import PATCH, vae_scale_factor

        unit = PATCH * vae_scale_factor(AutoencoderKLQwenImage.load_config(teacher, subfolder="vae"))
        if cfg.data.resolution % unit:
            raise ValueError(f"data.resolution: {self.name} latents are cut into 2x2 patches, so the resolution "
                             f"must be a multiple of {unit} px (got {cfg.data.resolution})")

    def load_teacher(self, cfg: Config, teacher_path: str):
        """fp32 weights (generator and fake score are copied from them; the frozen teacher is
        stored in bf16 afterwards under train.mixed_precision bf16, as for every family)."""
        from dmdscale.families.qwenimage.model import load_qwen_teacher

        return load_qwen_teacher(teacher_path, cfg.data.resolution, torch.float32, cfg.loss.gan_feature_depths)

    def prompt_encoder(self, teacher: str, device: torch.device | str) -> Any:
        from dmdscale.families.qwenimage.text import QwenPromptEncoder

        return QwenPromptEncoder.load(teacher, device)

    def latent_encoder(self, teacher: str, device: torch.device | str) -> Any:
        from dmdscale.families.qwenimage.model import QwenVaeLatents

        return QwenVaeLatents(teacher, device)

    def latent_shape(self, teacher: str, resolution: int) -> tuple[int, int, int]:
        from dmdscale.families.qwenimage.model import latent_shape

        return latent_shape(teacher, resolution)

    def student_pipeline(self, cfg: Config, teacher: str, network: torch.nn.Module | None = None,
                         ) -> tuple[Any, dict[str, Any]]:
        from dmdscale.families.qwenimage.export import student_pipeline

        return student_pipeline(teacher, cfg.generator.timesteps, cfg.data.resolution, network)

    def export_student(self, cfg: Config, network_dir: Path, student_dir: Path, lora: dict[str, Any] | None) -> Path:
        from dmdscale.families.qwenimage.export import export_qwen_pipeline

        return export_qwen_pipeline(cfg.model.teacher, network_dir, cfg.generator.timesteps, student_dir,
                                    cfg.data.resolution, lora_state_dict=lora,
                                    lora_config=lora_config(cfg) if cfg.lora.enabled else None,
                                    fp16_variant=cfg.export.fp16_variant)

    def teacher_call(self, cfg: Config) -> dict[str, Any]:
        """Qwen-Image's own CFG: a negative pass at true_cfg_scale (the model card's " ")."""
        from dmdscale.families.qwenimage.text import NEGATIVE_PROMPT

        return {"num_inference_steps": cfg.eval.teacher_steps, "true_cfg_scale": cfg.loss.guidance_scale,
                "negative_prompt": NEGATIVE_PROMPT}
