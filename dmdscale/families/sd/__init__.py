"""sd15 and sdxl: Stable Diffusion latent UNet teachers (a diffusers pipeline folder or hub id).

Everything a text-to-image family shares comes from `TextToImageFamily`
(`dmdscale.families.text2image`): images with captions encoded into VAE latents and CLIP text
embeddings, LoRA, checkpoint evaluation, the final evaluation. What is SD's: the teacher is a
`TextConditionalUNet` on the DDPM noise schedule, the discriminator reads the UNet's mid block
(`loss.gan_head`), and the student is exported as the teacher's pipeline around a guidance-free
UNet with a stock LCMScheduler (`export.py`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dmdscale.config import Config
from dmdscale.families.sd.memory import PROFILES
from dmdscale.families.text2image import Inputs, TextToImageFamily, lora_config

__all__ = ["SDFamily", "Inputs"]


class SDFamily(TextToImageFamily):
    """One Stable Diffusion variant (`dmdscale.models.variants.SD_VARIANTS`) as a family."""

    network = "unet"

    def __init__(self, variant: str):
        super().__init__(variant)
        self.memory_profile = PROFILES[variant]

    def check_teacher_folder(self, teacher: str) -> str:
        from dmdscale.families.sd.model import check_pipeline_folder

        return check_pipeline_folder(teacher, self.name)

    def load_teacher(self, cfg: Config, teacher_path: str):
        """fp32 weights whatever train.mixed_precision says: generator and fake score are copied
        from them and train in fp32 under bf16 autocast (`build_players` stores the frozen
        teacher in bf16 after copying, as the DMD2 authors do)."""
        from dmdscale.families.sd.model import load_sd_teacher

        return load_sd_teacher(teacher_path, self.name, torch.float32)

    def student_pipeline(self, cfg: Config, teacher: str, network: torch.nn.Module | None = None,
                         ) -> tuple[Any, dict[str, Any]]:
        from dmdscale.families.sd.export import student_pipeline

        return student_pipeline(teacher, self.name, cfg.generator.timesteps, network)

    def exported_network(self, network: torch.nn.Module) -> torch.nn.Module:
        """Guidance-free (`dmdscale.export.guidance_free_unet`): stock pipelines then skip CFG."""
        from dmdscale.export import guidance_free_unet

        return guidance_free_unet(network)

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
