"""Qwen-Image prompt encoding: QwenImagePipeline's own `encode_prompt` (its chat template, the drop of
the template's system prefix, the last hidden state of Qwen2.5-VL), padded to a fixed length.

The pipeline returns each batch at its longest prompt's length and drops the mask when no row is
padded; a data set needs rows that stack across batches, so `encode` pads every batch to
`max_sequence_length` tokens (zeros) and always returns the mask: 1.0 for a prompt token, 0.0 for
padding, float32 like the embeddings (a data set stores every column as float; the transformer reads
any nonzero entry as a token). Padded embeddings with their mask give the transformer's image
output of the unpadded ones: padding is masked out of the joint attention, and the text positions
of the rope start at the same index whatever the length.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

# QwenImagePipeline.__call__'s default max_sequence_length: the text tokens (after the template's
# system prefix) the teacher sees at inference; longer prompts are cut there, as the pipeline cuts them.
MAX_SEQUENCE_LENGTH = 512
# The pipeline's hard limit (its check_inputs; tokenizer_max_length).
MAX_SEQUENCE_LENGTH_LIMIT = 1024
# The negative prompt of Qwen/Qwen-Image's model card ("Recommended if you don't use a negative
# prompt"), which its true CFG (true_cfg_scale 4.0) runs against; the pipeline itself has no default.
NEGATIVE_PROMPT = " "


def fixed_length(embeds: Tensor, mask: Tensor | None, length: int) -> dict[str, Tensor]:
    """(B, l, D) embeddings and their (B, l) mask (None: no padding) cut or zero-padded to `length`
    tokens: {"prompt_embeds": (B, length, D), "prompt_embeds_mask": (B, length) float, 1 = token}."""
    b, n = embeds.shape[:2]
    mask = torch.ones(b, n, device=embeds.device) if mask is None else mask.to(embeds.device)
    embeds, mask = embeds[:, :length], mask[:, :length].float()
    pad = length - embeds.shape[1]
    if pad > 0:
        embeds = torch.cat([embeds, embeds.new_zeros(b, pad, embeds.shape[2])], dim=1)
        mask = torch.cat([mask, mask.new_zeros(b, pad)], dim=1)
    return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}


class QwenPromptEncoder:
    """Tokenizer + frozen Qwen2.5-VL text encoder of a Qwen-Image pipeline: `encode(prompts)` ->
    {"prompt_embeds": (B, L, D), "prompt_embeds_mask": (B, L) float32}, L = `max_sequence_length`.
    Holds the pipeline (no lambdas), so it is built as is inside a Ray actor."""

    def __init__(self, pipe, device: torch.device | str = "cpu", max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH_LIMIT:
            raise ValueError(f"max_sequence_length {max_sequence_length}: QwenImagePipeline takes 1 to "
                             f"{MAX_SEQUENCE_LENGTH_LIMIT} text tokens")
        self.pipe, self.device, self.max_sequence_length = pipe, torch.device(device), max_sequence_length

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> "QwenPromptEncoder":
        """The pipeline of a Qwen-Image folder (or hub id) from its text parts alone: the transformer
        and VAE are passed as None, so their weights are not read."""
        from diffusers import QwenImagePipeline

        pipe = QwenImagePipeline.from_pretrained(os.fspath(path), transformer=None, vae=None, dtype=dtype)
        pipe.text_encoder.to(device).eval().requires_grad_(False)
        return cls(pipe, device, max_sequence_length)

    @torch.no_grad()
    def encode_unpadded(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        """The pipeline's own (prompt_embeds, prompt_embeds_mask) for `prompts`: (B, longest, D), and
        its (B, longest) int64 mask, None when no row is padded."""
        return self.pipe.encode_prompt([str(p) for p in prompts], device=self.device, num_images_per_prompt=1,
                                       max_sequence_length=self.max_sequence_length)

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, mask = self.encode_unpadded(prompts)
        return fixed_length(embeds, mask, self.max_sequence_length)
