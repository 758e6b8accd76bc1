"""Prompt encoding for the text-to-image families, as the diffusers pipelines do it.

SD1.5: the CLIP text encoder's last hidden state. SDXL: the penultimate hidden states of both
encoders concatenated, and encoder 2's projected pooled output (`text_embeds`).
"""
from __future__ import annotations

import os

import torch
from torch import Tensor


class PromptEncoder:
    """Tokenizer(s) + frozen text encoder(s) of a pipeline: `encode(prompts) -> cond dict`."""

    def __init__(self, family: str, tokenizers: list, encoders: list, device: torch.device | str = "cpu"):
        self.family, self.tokenizers, self.encoders = family, tokenizers, encoders
        self.device = torch.device(device)

    @classmethod
    def load(cls, path: str | os.PathLike, family: str, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> "PromptEncoder":
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from dmdscale.models.sd import sd_variant

        p = os.fspath(path)
        tokenizers = [CLIPTokenizer.from_pretrained(p, subfolder="tokenizer")]
        encoders = [CLIPTextModel.from_pretrained(p, subfolder="text_encoder", torch_dtype=dtype)]
        if sd_variant(family).dual_text_encoder:
            tokenizers.append(CLIPTokenizer.from_pretrained(p, subfolder="tokenizer_2"))
            encoders.append(CLIPTextModelWithProjection.from_pretrained(p, subfolder="text_encoder_2",
                                                                        torch_dtype=dtype))
        encoders = [e.to(device).eval().requires_grad_(False) for e in encoders]
        return cls(family, tokenizers, encoders, device)

    def _ids(self, tokenizer, prompts: list[str]) -> Tensor:
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        prompts = [str(p) for p in prompts]
        if len(self.encoders) == 1:
            return {"prompt_embeds": self.encoders[0](self._ids(self.tokenizers[0], prompts))[0]}
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders):
            out = encoder(self._ids(tokenizer, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's (encoder 2's) projected pooled embedding
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}
