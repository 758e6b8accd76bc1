"""A tiny Qwen-Image pipeline with random weights, built from configs offline.

Real: the classes and folder layout of Qwen/Qwen-Image (`QwenImagePipeline`: QwenImageTransformer2DModel,
AutoencoderKLQwenImage, a Qwen2_5_VLForConditionalGeneration text encoder with a Qwen2 tokenizer,
FlowMatchEulerDiscreteScheduler), the transformer's 64 packed input channels (16 latent channels x 2x2
patches) and 16 output channels, the VAE's z_dim 16 with the real per-channel `latents_mean` /
`latents_std`, the scheduler config as shipped (vae/ and scheduler/ config.json of Qwen/Qwen-Image), the
prompt template's special tokens and its 34-token system prefix, which the pipeline drops
(`prompt_template_encode_start_idx`).
Shrunk: 2 transformer blocks of width 32 (2 heads x 16, rope axes 4 + 6 + 6), a VAE that downsamples 4x
(not 8x) with 8 base channels, a 2-layer text model of width 32 and a 1-block vision tower, and a
byte-level BPE tokenizer whose only merges spell the template's words (so its system prefix is 34 tokens,
as with the real 151k-token vocabulary); prompts themselves tokenize nearly byte by byte.

    python -m dmdscale.families.qwenimage.tiny --out /tmp/tiny-qwenimage
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch

LATENT_CHANNELS = 16  # the real VAE's z_dim
TEXT_DIM = 32  # the text model's width: the transformer's joint_attention_dim (3584 in Qwen2.5-VL-7B)
# Qwen/Qwen-Image vae/config.json (AutoencoderKLQwenImage, also diffusers' defaults).
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
# Qwen/Qwen-Image scheduler/scheduler_config.json: resolution-dependent exponential shift, mu linear in
# the image's token count from 0.5 (256 tokens) to 0.9 (8192); sigmas stretched to end at 0.02 when
# sampling many steps. (math.log(3) for both shifts is Qwen-Image-Lightning's distilled scheduler, not this.)
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9,
    "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential",
    "invert_sigmas": False, "stochastic_sampling": False, "use_karras_sigmas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False,
}
# Qwen2.5-VL's special tokens, in the order of their real ids 151643..151656 (tokenizer_config.json).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def _prompt_template() -> tuple[str, int]:
    """The pipeline's own prompt template and the number of leading tokens encode_prompt drops."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx


def tiny_qwen_tokenizer():
    """A Qwen2 tokenizer (byte-level BPE, Qwen2's pre-tokenizer) trained on the prompt template's text
    alone: every byte is a token, each template word one token, and the special tokens are special, so
    the template's system prefix is as many tokens as the pipeline drops."""
    from tokenizers import pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer

    template, drop = _prompt_template()
    backend = Qwen2Tokenizer().backend_tokenizer  # Qwen2's normalizer, pre-tokenizer and byte-level decoder
    backend.model = BPE()
    split = "|".join(re.escape(s) for s in SPECIAL_TOKENS)
    words = [piece for piece in re.split(split, template.replace("{}", "")) if piece]
    trainer = trainers.BpeTrainer(vocab_size=4096, min_frequency=1, show_progress=False, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(words, trainer)
    bpe = json.loads(backend.to_str())["model"]
    tokenizer = Qwen2Tokenizer(vocab=bpe["vocab"], merges=[tuple(m) for m in bpe["merges"]], eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=131072)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    prefix = template.split("{}")[0]
    if len(tokenizer(prefix).input_ids) != drop:
        raise RuntimeError(f"the tiny tokenizer splits the template's system prefix into "
                           f"{len(tokenizer(prefix).input_ids)} tokens, the pipeline drops {drop}")
    return tokenizer


def tiny_text_encoder(tokenizer):
    """Qwen2.5-VL with a 2-layer text model (GQA, mrope sections in the real 1:1.5:1.5 ratio) and a
    1-block vision tower projecting to the text width; its special token ids are the tokenizer's."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                             "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_DIM,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_vae():
    """AutoencoderKLQwenImage at 4x downsampling (dim_mult [1, 2, 2]), z_dim 16, the real latent statistics."""
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=LATENTS_MEAN,
                                  latents_std=LATENTS_STD)


def tiny_transformer_config() -> dict[str, Any]:
    """Two dual-stream blocks of width 32; packed 2x2 patches in, 16 latent channels out as the real one."""
    return dict(patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM, guidance_embeds=False,
                axes_dims_rope=(4, 6, 6))


def build_tiny_qwen_pipeline(out: str | Path, resolution: int = 32, seed: int = 0) -> Path:
    """Write a random-weight QwenImagePipeline folder that stock `DiffusionPipeline.from_pretrained`
    loads and samples at `resolution` px (a multiple of 8: the VAE's 4x times the 2x2 packing)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    if resolution % 8:
        raise ValueError(f"resolution {resolution}: the tiny Qwen-Image pipeline needs a multiple of 8")
    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    pipe = QwenImagePipeline(transformer=QwenImageTransformer2DModel(**tiny_transformer_config()), vae=tiny_vae(),
                             text_encoder=tiny_text_encoder(tokenizer), tokenizer=tokenizer,
                             scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG))
    pipe.save_pretrained(out)
    return Path(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write a tiny random-weight Qwen-Image pipeline folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    print(build_tiny_qwen_pipeline(args.out, args.resolution))
