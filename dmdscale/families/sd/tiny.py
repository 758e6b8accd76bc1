"""Tiny SD1.5- and SDXL-architecture pipelines with random weights, built from configs offline.

For tests, smoke runs and `ray job submit` rehearsals: the same classes, folder layout and code
paths as the real models (UNet2DConditionModel with cross-attention and, for SDXL, text_time
micro-conditioning; AutoencoderKL; CLIP text encoders; CLIP tokenizers), small enough for CPU.
The tokenizers are built from a hand-written character vocabulary (no merges), so nothing is
downloaded.

    python -m dmdscale.families.sd.tiny --family sdxl --out /tmp/tiny-sdxl
"""
from __future__ import annotations

import argparse
import json
import string
import tempfile
from pathlib import Path

import torch

from dmdscale.models.variants import SD_VARIANTS, sd_variant

TEXT_DIM = 32  # each CLIP encoder's hidden size
POOLED_DIM = 32  # SDXL encoder 2's projection
TIME_DIM = 8  # SDXL addition_time_embed_dim


def tiny_tokenizer(folder: Path):
    """A CLIP tokenizer over lower-case letters, digits and a few symbols, one token per char."""
    from transformers import CLIPTokenizer

    chars = string.ascii_lowercase + string.digits + ".,-'"
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=32)


def text_encoder(with_projection: bool, vocab: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab, hidden_size=TEXT_DIM, intermediate_size=64,
                            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=32,
                            projection_dim=POOLED_DIM, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def tiny_unet_config(family: str, latent_size: int = 16) -> dict:
    """Two levels (32, 64 channels), cross-attention at the second and in the mid block."""
    config = {
        "sample_size": latent_size, "in_channels": 4, "out_channels": 4,
        "block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": 8, "cross_attention_dim": TEXT_DIM,
    }
    if sd_variant(family).micro_conditioning:
        config |= {"cross_attention_dim": 2 * TEXT_DIM, "addition_embed_type": "text_time",
                   "addition_time_embed_dim": TIME_DIM, "use_linear_projection": True,
                   "projection_class_embeddings_input_dim": 6 * TIME_DIM + POOLED_DIM,
                   "transformer_layers_per_block": (1, 2)}
    return config


def build_tiny_pipeline(family: str, out: str | Path, resolution: int = 32, seed: int = 0,
                        prediction_type: str = "epsilon") -> Path:
    """Write a random-weight `family` ("sd15" or "sdxl") pipeline folder for `resolution` px images."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    variant = sd_variant(family)  # raises for an unknown name
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=resolution)  # downsamples by 2
    unet = UNet2DConditionModel(**tiny_unet_config(family, resolution // 2))
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type=prediction_type, timestep_spacing="leading", steps_offset=1)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(Path(tmp) / "tok")
        vocab = len(tokenizer)
        if not variant.dual_text_encoder:
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder(False, vocab), tokenizer=tokenizer,
                                           unet=unet, scheduler=PNDMScheduler(**schedule, skip_prk_steps=True),
                                           safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        else:
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder(False, vocab),
                                             text_encoder_2=text_encoder(True, vocab), tokenizer=tokenizer,
                                             tokenizer_2=tiny_tokenizer(Path(tmp) / "tok2"), unet=unet,
                                             scheduler=EulerDiscreteScheduler(**schedule))
        pipe.save_pretrained(out)
    return Path(out)


def build_tiny_clip(out: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Write a random-weight transformers CLIPModel folder (with its CLIPImageProcessor and the
    character tokenizer of `tiny_tokenizer`) for CLIP score and CLIP-feature FID in tests. The
    text projection's sign is chosen so that image and text embeddings agree on average: random
    towers otherwise often disagree everywhere, and every CLIP score would clamp to 0."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = tiny_tokenizer(Path(tmp) / "tok")
        text = dict(vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        vision = dict(hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=image_size, patch_size=8)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=POOLED_DIM)).eval()
        with torch.no_grad():
            tokens = tokenizer(["a photo", "digit 3", "two cats"], padding=True, return_tensors="pt")
            text_emb = model.get_text_features(**tokens)
            image_emb = model.get_image_features(pixel_values=torch.randn(3, 3, image_size, image_size))
            text_emb, image_emb = (e if isinstance(e, torch.Tensor) else e.pooler_output for e in (text_emb, image_emb))
            if torch.nn.functional.cosine_similarity(text_emb, image_emb).mean() < 0:
                model.text_projection.weight.neg_()
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write a tiny random-weight SD1.5/SDXL pipeline folder")
    parser.add_argument("--family", choices=list(SD_VARIANTS), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    print(build_tiny_pipeline(args.family, args.out, args.resolution))
