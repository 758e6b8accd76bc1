"""Qwen-Image in the DMD2 memory planner (`dmdscale.tools.memory`; `python -m dmdscale.memory`): `PROFILE`.

TRANSFORMER_CONFIG is Qwen/Qwen-Image's transformer/config.json (QwenImageTransformer2DModel, diffusers):
60 dual-stream blocks of 24 heads x 128 (width 3072), text from Qwen2.5-VL-7B's 3584-wide hidden
states, 2x2-packed 16-channel latents in (64 channels) and 16 out, rope axes 16 + 56 + 56 = 128, no
guidance embedding. The same values are diffusers' defaults for this class (0.42) and appear verbatim
in public code that rebuilds the model without downloading it; "_"-prefixed keys are left out.
Built on the meta device it has 20,430,401,088 parameters (20.4B, as the model card states).
"""
from __future__ import annotations

from typing import Any

from dmdscale.tools.memory import MemoryProfile

MODEL_CLASS = "QwenImageTransformer2DModel"
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False, "axes_dims_rope": [16, 56, 56],
}
PARAMETERS = 20_430_401_088  # the meta-device count of TRANSFORMER_CONFIG (tests/unit/test_qwenimage.py)
# LoRA targets: every attention and feed-forward linear of a block (module-name suffixes, as peft's
# target_modules matches them): the image stream's q/k/v/out and the text stream's added q/k/v/out of the
# joint attention, and both streams' MLPs (GELU-tanh: net.0.proj in, net.2 out). Left out: the adaLN
# modulation linears (img_mod.1, txt_mod.1), the embedders (img_in, txt_in, time_text_embed) and the
# output projection (norm_out.linear, proj_out).
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")

# Activations, GiB per image, bf16, without / with gradient checkpointing: ESTIMATES by FLUX's method
# (dmdscale/families/flow/memory.py: tokens x width x blocks). At Qwen-Image's native 1328 px: 6889
# image tokens (83 x 83 after 8x VAE downsampling and 2x2 packing) + 512 text tokens, width 3072, 60
# dual-stream blocks: about 1.7 x FLUX.1-dev at 1024 px (4096 + 512 tokens, width 3072, 57 blocks),
# so 1.7 x FLUX's 40 / 4 GiB. Not measured; replace with torch.cuda.max_memory_allocated around one
# step when a GPU is at hand.
PROFILE = MemoryProfile(name="qwenimage", model_class=MODEL_CLASS, config=TRANSFORMER_CONFIG, head="token",
                        activation_gib_per_image={False: 68.0, True: 7.0},
                        # The TokenHead reads the middle block by default: half the blocks run.
                        discriminator_share=0.5, lora_targets=LORA_TARGETS)
