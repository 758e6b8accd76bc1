"""sd3 and flux: flow-matching transformer teachers (a diffusers StableDiffusion3Pipeline or
FluxPipeline folder, or hub id).

Everything a text-to-image family shares comes from `SDFamily`: images with captions (or
prompts alone) encoded into VAE latents and text embeddings on the Ray Data actor pool or the
latent cache, LoRA on the generator, the evaluation of the exported pipeline against the
teacher's many-step sampler. What differs: the teacher is a `FlowTransformer` on a
`FlowMatchSchedule`, the discriminator reads transformer tokens at `loss.gan_feature_depths`
(`TokenHead`), and the student is exported as the teacher's own pipeline class around the
trained transformer with a flow-match scheduler at the student's timesteps.
Checkpoint evaluation during training is not offered for these families yet
(`has_eval_actors` False: eval.during_training has no effect; the final evaluation runs).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dmdscale.config import Config
from dmdscale.families.sd import STUDENT_LORA, SDFamily, lora_config

STUDENT_TRANSFORMER_DIR = "student_transformer"  # the final checkpoint's transformer


class FlowFamily(SDFamily):
    """One flow-matching transformer variant (`dmdscale.families.flow.model.FLOW_VARIANTS`) as a family."""

    student_parts = (STUDENT_TRANSFORMER_DIR, STUDENT_LORA)
    network = "transformer"
    network_dir = STUDENT_TRANSFORMER_DIR
    has_eval_actors = False

    def check_head(self, cfg: Config) -> None:
        if cfg.loss.gan_head != "conv":
            raise ValueError(f"loss.gan_head: {self.name}'s discriminator is a token head on transformer blocks "
                             f"(choose them with loss.gan_feature_depths); leave gan_head 'conv', got "
                             f"{cfg.loss.gan_head!r}")

    def check_teacher_folder(self, teacher: str) -> str:
        from dmdscale.families.flow.model import check_flow_folder

        return check_flow_folder(teacher, self.name)

    def preflight(self, cfg: Config) -> Any:
        """SDFamily's checks, and a resolution the transformer's 2x2 patches tile."""
        inputs = super().preflight(cfg)
        self._check_resolution(cfg, inputs.teacher_path)
        return inputs

    def _check_resolution(self, cfg: Config, teacher: str) -> None:
        from diffusers import AutoencoderKL

        from dmdscale.models.hub import is_local
        from dmdscale.families.flow.model import vae_scale_factor

        if not is_local(teacher):
            return  # a hub id's VAE is read at load time
        unit = 2 * vae_scale_factor(AutoencoderKL.load_config(teacher, subfolder="vae"))
        if cfg.data.resolution % unit:
            raise ValueError(f"data.resolution: {self.name} latents are cut into 2x2 patches, so the resolution "
                             f"must be a multiple of {unit} px (got {cfg.data.resolution})")

    def load_teacher(self, cfg: Config, teacher_path: str):
        """fp32 weights (generator and fake score are copied from them; see SDFamily.load_teacher)."""
        from dmdscale.families.flow.model import load_flow_teacher

        return load_flow_teacher(teacher_path, self.name, cfg.data.resolution, torch.float32,
                                 cfg.loss.gan_feature_depths)

    def critic_head(self, cfg: Config, fake_score) -> torch.nn.Module:
        from dmdscale.models.heads import TokenHead

        return TokenHead.for_model(fake_score)

    def export_student(self, cfg: Config, network_dir: Path, student_dir: Path, lora: dict[str, Any] | None) -> Path:
        """The teacher's pipeline class around the trained transformer (`export_flow_pipeline`)."""
        from dmdscale.families.flow.export import export_flow_pipeline

        return export_flow_pipeline(cfg.model.teacher, self.name, network_dir, cfg.generator.timesteps, student_dir,
                                    cfg.data.resolution, lora_state_dict=lora,
                                    lora_config=lora_config(cfg) if cfg.lora.enabled else None,
                                    fp16_variant=cfg.export.fp16_variant)

    def usage(self, cfg: Config, call: dict[str, Any]) -> str:
        lora = ("\n# Or the teacher with the LoRA adapter (peft keys):\n"
                f"# pipe = DiffusionPipeline.from_pretrained({str(cfg.model.teacher)!r})\n"
                "# pipe.load_lora_weights(\"STUDENT/lora\")\n") if cfg.lora.enabled else ""
        res = cfg.data.resolution
        return f"""from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("STUDENT")  # variant="fp16", dtype=torch.float16 if exported
# At the trained resolution (FLUX's timestep shift depends on it); guidance is distilled in.
image = pipe("a photo of a cat", height={res}, width={res}, {", ".join(f"{k}={v}" for k, v in call.items())}).images[0]
{lora}"""

    def start_eval_pool(self, cfg: Config, inputs: Any, tracker: Any) -> Any:
        raise NotImplementedError(f"{self.name}: no checkpoint evaluation actors")
