"""sd3 and flux: flow-matching transformer teachers (a diffusers StableDiffusion3Pipeline or
FluxPipeline folder, or hub id).

Everything a text-to-image family shares comes from `TextToImageFamily`
(`dmdscale.families.text2image`): images with captions (or prompts alone) encoded into VAE
latents and text embeddings on the Ray Data actor pool or the latent cache, LoRA on the
generator, checkpoint evaluation while training, the evaluation of the exported pipeline against
the teacher's many-step sampler. What is theirs: the teacher is a `FlowTransformer` on a
`FlowMatchSchedule`, the discriminator reads transformer tokens at `loss.gan_feature_depths`
(`TokenHead`), and the student is exported as the teacher's own pipeline class around the
trained transformer with a flow-match scheduler at the student's timesteps (`export.py`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dmdscale.config import Config
from dmdscale.families.flow.memory import PROFILES
from dmdscale.families.text2image import TextToImageFamily, lora_config


class FlowFamily(TextToImageFamily):
    """One flow-matching transformer variant (`dmdscale.models.variants.FLOW_VARIANTS`) as a family."""

    network = "transformer"
    token_head = True

    def __init__(self, variant: str):
        super().__init__(variant)
        self.memory_profile = PROFILES[variant]

    def check_teacher_folder(self, teacher: str) -> str:
        from dmdscale.families.flow.model import check_flow_folder

        return check_flow_folder(teacher, self.name)

    def check_resolution(self, cfg: Config, teacher: str) -> None:
        """A resolution the transformer's 2x2 patches tile."""
        from diffusers import AutoencoderKL

        from dmdscale.families.flow.model import vae_scale_factor

        unit = 2 * vae_scale_factor(AutoencoderKL.load_config(teacher, subfolder="vae"))
        if cfg.data.resolution % unit:
            raise ValueError(f"data.resolution: {self.name} latents are cut into 2x2 patches, so the resolution "
                             f"must be a multiple of {unit} px (got {cfg.data.resolution})")

    def load_teacher(self, cfg: Config, teacher_path: str):
        """fp32 weights (generator and fake score are copied from them; see SDFamily.load_teacher)."""
        from dmdscale.families.flow.model import load_flow_teacher

        return load_flow_teacher(teacher_path, self.name, cfg.data.resolution, torch.float32,
                                 cfg.loss.gan_feature_depths)

    def student_pipeline(self, cfg: Config, teacher: str, network: torch.nn.Module | None = None,
                         ) -> tuple[Any, dict[str, Any]]:
        from dmdscale.families.flow.export import flow_student_pipeline

        return flow_student_pipeline(teacher, self.name, cfg.generator.timesteps, cfg.data.resolution, network)

    def export_student(self, cfg: Config, network_dir: Path, student_dir: Path, lora: dict[str, Any] | None) -> Path:
        """The teacher's pipeline class around the trained transformer (`export_flow_pipeline`)."""
        from dmdscale.families.flow.export import export_flow_pipeline

        return export_flow_pipeline(cfg.model.teacher, self.name, network_dir, cfg.generator.timesteps, student_dir,
                                    cfg.data.resolution, lora_state_dict=lora,
                                    lora_config=lora_config(cfg) if cfg.lora.enabled else None,
                                    fp16_variant=cfg.export.fp16_variant)
