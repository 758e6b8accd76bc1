"""sd15 and sdxl in the DMD2 memory planner (`dmdscale.tools.memory`; the command
`python -m dmdscale.memory`): each UNet's published config, the critic's ConvHead, the
activation estimates with the figures they come from, and the LoRA targets, as `PROFILES`."""
from __future__ import annotations

from typing import Any

from dmdscale.config import LoraConfig
from dmdscale.tools.memory import MemoryProfile

# Published diffusers configs (unet/config.json) of stable-diffusion-v1-5/stable-diffusion-v1-5
# and stabilityai/stable-diffusion-xl-base-1.0; keys left out take diffusers' defaults, which
# match those files.
_COMMON: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "act_fn": "silu",
    "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
}
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": _COMMON | {
        "sample_size": 64,
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    },
    "sdxl": _COMMON | {
        "sample_size": 128,
        "block_out_channels": [320, 640, 1280],
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20],
        "cross_attention_dim": 2048,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True,
    },
}
# The generator's LoRA targets: the training config's defaults (the DMD2 authors' list:
# attention, convs, ff, time projections); both UNets have every one of them.
LORA_TARGETS = tuple(LoraConfig().targets)
# Share of a full forward the discriminator runs, in activations. UNets: it reads the fake
# score's mid-block output, so it runs the encoder and mid block only: a bit under half the UNet
# (the decoder has 3 ResNets per level, the encoder 2); 0.5 rounds up.
DISCRIMINATOR_SHARE = 0.5

# activation_gib_per_image: GiB of activations one denoiser forward keeps for its backward, per
# image at the family's native resolution, bf16, keyed by gradient checkpointing. ESTIMATES, not
# measured by this project; replace them with a measurement (torch.cuda.max_memory_allocated
# around one step) when a GPU is at hand.
# - UNets (SD1.5: 512 px, 64x64 latents; SDXL: 1024 px, 128x128 latents): rough public figures
#   from fine-tuning them (SDXL about 20-25 GB per image without checkpointing, 3-4 GB with;
#   SD1.5 about 6 GB without, 1 GB with).
PROFILES: dict[str, MemoryProfile] = {
    "sd15": MemoryProfile(
        name="sd15", model_class="UNet2DConditionModel", config=UNET_CONFIGS["sd15"], head="conv",
        activation_gib_per_image={False: 6.0, True: 1.0}, discriminator_share=DISCRIMINATOR_SHARE,
        lora_targets=LORA_TARGETS),
    "sdxl": MemoryProfile(
        name="sdxl", model_class="UNet2DConditionModel", config=UNET_CONFIGS["sdxl"], head="conv",
        activation_gib_per_image={False: 22.0, True: 3.5}, discriminator_share=DISCRIMINATOR_SHARE,
        lora_targets=LORA_TARGETS),
}
