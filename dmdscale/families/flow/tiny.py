"""Tiny SD3- and FLUX-architecture pipelines with random weights, built from configs offline.

The flow-matching counterparts of `dmdscale.families.sd.tiny`: the same classes, folder layout and
code paths as SD3.5-Large (`StableDiffusion3Pipeline`: SD3Transformer2DModel with qk RMS-norm,
two projected CLIP encoders + T5) and FLUX.1-dev (`FluxPipeline`: FluxTransformer2DModel with
guidance embedding, CLIP pooled + T5), 16-channel VAEs without quant convs and the real
latent scaling/shift factors and scheduler settings, small enough for CPU tests. Tokenizers
are built from a character vocabulary, so nothing is downloaded.

    python -m dmdscale.families.flow.tiny --family flux --out /tmp/tiny-flux
"""
from __future__ import annotations

import argparse
import string
import tempfile
from pathlib import Path

import torch

from dmdscale.models.variants import FLOW_VARIANTS, flow_variant
from dmdscale.families.sd.tiny import POOLED_DIM, TEXT_DIM, text_encoder, tiny_tokenizer

LATENT_CHANNELS = 16  # both real VAEs
# Wider than both CLIP encoders' states concatenated: SD3's encode_prompt zero-pads them to T5's
# width (2048 -> 4096 in the real model), and the tiny one should take that path too.
T5_DIM = 96
T5_MAX_LENGTH = 512  # FLUX's default max_sequence_length (SD3's is 256)
# The real VAEs' latent normalisation (vae/config.json of SD3.5-Large and FLUX.1-dev).
VAE_FACTORS = {"sd3": dict(scaling_factor=1.5305, shift_factor=0.0609),
               "flux": dict(scaling_factor=0.3611, shift_factor=0.1159)}
# scheduler/scheduler_config.json as shipped: SD3.5-Large {"shift": 3.0}; FLUX.1-dev resolution-
# dependent shifting {"use_dynamic_shifting": true, "base_shift": 0.5, "max_shift": 1.15,
# "base_image_seq_len": 256, "max_image_seq_len": 4096, "shift": 3.0}.
SCHEDULERS = {"sd3": dict(num_train_timesteps=1000, shift=3.0),
              "flux": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                           max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)}


def tiny_t5_tokenizer():
    """A T5 (Unigram, SentencePiece-style) tokenizer over single characters: <pad>=0, </s>=1,
    <unk>=2 as in T5, an </s> appended to every sequence, no sentinel tokens."""
    from transformers import T5TokenizerFast

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + ".,-'"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -3.0) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _t5_encoder(vocab: int):
    from transformers import T5Config, T5EncoderModel

    # T5 v1.1 (gated-GELU), the encoder both pipelines use.
    config = T5Config(vocab_size=vocab, d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=32,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config)


def _vae(family: str, resolution: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=resolution, use_quant_conv=False, use_post_quant_conv=False,
                         **VAE_FACTORS[family])  # downsamples by 2


def tiny_transformer_config(family: str, latent_size: int = 16) -> dict:
    """Two joint blocks (SD3) / one double- and one single-stream block (FLUX), inner width 32."""
    configs = {
        # caption_projection_dim is the inner width (heads x head dim); pooled: both CLIP projections;
        # patch positions up to 2x the resolution.
        "sd3": dict(sample_size=latent_size, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                    num_layers=2, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_DIM,
                    caption_projection_dim=32, pooled_projection_dim=2 * POOLED_DIM,
                    pos_embed_max_size=latent_size, qk_norm="rms_norm"),
        # FLUX packs 2x2 latent patches into the channels; the rope axes split the head dim.
        "flux": dict(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1,
                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_DIM,
                     pooled_projection_dim=TEXT_DIM, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
    }
    return configs[flow_variant(family).name]


def _text_parts(family: str, tmp: Path) -> dict:
    """The pipeline's tokenizers and text encoders: SD3 two projected CLIPs + T5, FLUX CLIP + T5."""
    clip, t5 = tiny_tokenizer(tmp / "tok"), tiny_t5_tokenizer()
    vocab = len(clip)
    parts = {
        "sd3": lambda: dict(text_encoder=text_encoder(True, vocab), tokenizer=clip,
                            text_encoder_2=text_encoder(True, vocab), tokenizer_2=tiny_tokenizer(tmp / "tok2"),
                            text_encoder_3=_t5_encoder(len(t5)), tokenizer_3=t5),
        "flux": lambda: dict(text_encoder=text_encoder(False, vocab), tokenizer=clip,
                             text_encoder_2=_t5_encoder(len(t5)), tokenizer_2=t5),
    }
    return parts[family]()


def build_tiny_flow_pipeline(family: str, out: str | Path, resolution: int = 32, seed: int = 0) -> Path:
    """Write a random-weight `family` ("sd3" or "flux") pipeline folder for `resolution` px images."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dmdscale.families.flow.model import transformer_class

    variant = flow_variant(family)  # raises for an unknown name
    torch.manual_seed(seed)
    vae = _vae(family, resolution)
    transformer = transformer_class(family)(**tiny_transformer_config(family, resolution // 2))
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[family])
    with tempfile.TemporaryDirectory() as tmp:
        pipe = getattr(diffusers, variant.pipeline_class)(transformer=transformer, scheduler=scheduler, vae=vae,
                                                          **_text_parts(family, Path(tmp)))
        pipe.save_pretrained(out)
    return Path(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write a tiny random-weight SD3/FLUX pipeline folder")
    parser.add_argument("--family", choices=list(FLOW_VARIANTS), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    print(build_tiny_flow_pipeline(args.family, args.out, args.resolution))
