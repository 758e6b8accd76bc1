"""sd3 and flux in the DMD2 memory planner (`dmdscale.tools.memory`; the command
`python -m dmdscale.memory`): each transformer's published config, the critic's TokenHead, the
activation estimates with the figures they come from, and the LoRA targets, as `PROFILES`."""
from __future__ import annotations

from typing import Any

from dmdscale.tools.memory import MemoryProfile

# Published diffusers configs (transformer/config.json) of stabilityai/stable-diffusion-3.5-large
# (SD3Transformer2DModel, 8.1B parameters) and black-forest-labs/FLUX.1-dev
# (FluxTransformer2DModel, ~12B), as reproduced verbatim in public code that builds these models
# without the gated download (e.g. tenstorrent's and Comfy-Org loaders); "_"-prefixed keys and
# diffusers' defaults left out.
TRANSFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    "sd3": {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
        "num_layers": 38, "num_attention_heads": 38, "attention_head_dim": 64,
        "joint_attention_dim": 4096, "caption_projection_dim": 2432, "pooled_projection_dim": 2048,
        "pos_embed_max_size": 192, "qk_norm": "rms_norm", "dual_attention_layers": [],
    },
    "flux": {
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
        "num_attention_heads": 24, "attention_head_dim": 128, "joint_attention_dim": 4096,
        "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": [16, 56, 56],
    },
}
# LoRA targets on the transformers' attention and feed-forward linears (issue 16), filtered to
# the modules a family has (`dmdscale.tools.memory.lora_targets`): SD3 has no `proj_mlp` (FLUX's
# single blocks do). "proj_out" also matches the final output projection of both.
TRANSFORMER_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                            "ff_context.net.2", "proj_mlp", "proj_out")
# Share of a full forward the discriminator runs, in activations. Transformers: the TokenHead
# reads the hidden states at one depth, by default the middle block, so it runs half the blocks.
DISCRIMINATOR_SHARE = 0.5

# activation_gib_per_image: GiB of activations one denoiser forward keeps for its backward, per
# image at the family's native resolution, bf16, keyed by gradient checkpointing. ESTIMATES, not
# measured by this project; replace them with a measurement (torch.cuda.max_memory_allocated
# around one step) when a GPU is at hand.
# - FLUX.1-dev at 1024 px: 4096 image tokens (128x128 latents, 2x2 patches) + 512 T5 tokens,
#   width 3072, 19 double + 38 single blocks. With checkpointing: SimpleTuner's FLUX quickstart
#   reports "a bit more than 30G" for a rank-16 LoRA on every block over the bf16 base (~24 GB),
#   so ~6 GB for activations, adapters and CUDA context: 4 GiB assumed for activations. Without:
#   no public figure; counted here as ~20 (tokens x width) bf16 tensors kept per block x 57
#   blocks ~ 32 GiB, rounded up to 40 for the fp32 norm outputs autocast keeps.
# - SD3.5-Large at 1024 px: 4096 image + 333 text tokens (77 CLIP + 256 T5), width 2432, 38 joint
#   blocks: tokens x width x blocks is half FLUX's, so half FLUX's figures (no public figure).
PROFILES: dict[str, MemoryProfile] = {
    "sd3": MemoryProfile(
        name="sd3", model_class="SD3Transformer2DModel", config=TRANSFORMER_CONFIGS["sd3"], head="token",
        activation_gib_per_image={False: 20.0, True: 2.0}, discriminator_share=DISCRIMINATOR_SHARE,
        lora_targets=TRANSFORMER_LORA_TARGETS),
    "flux": MemoryProfile(
        name="flux", model_class="FluxTransformer2DModel", config=TRANSFORMER_CONFIGS["flux"], head="token",
        activation_gib_per_image={False: 40.0, True: 4.0}, discriminator_share=DISCRIMINATOR_SHARE,
        lora_targets=TRANSFORMER_LORA_TARGETS),
}
