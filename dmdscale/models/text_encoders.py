"""Prompt encoding for the text-to-image families, as the diffusers pipelines do it.

SD1.5: the CLIP text encoder's last hidden state. SDXL: the penultimate hidden states of both
encoders concatenated, and encoder 2's projected pooled output (`text_embeds`).
SD3 and FLUX: whatever the pipeline's own `encode_prompt` returns (CLIP + T5 states as
`prompt_embeds`, CLIP pooled output(s) as `pooled_prompt_embeds`), computed by diffusers itself.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from dmdscale.models.variants import FLOW_VARIANTS, flow_variant, sd_variant


class PromptEncoder:
    """Tokenizer(s) + frozen text encoder(s) of a pipeline: `encode(prompts) -> cond dict`."""

    def __init__(self, family: str, tokenizers: list, encoders: list, device: torch.device | str = "cpu"):
        self.family, self.tokenizers, self.encoders = family, tokenizers, encoders
        self.device = torch.device(device)

    @classmethod
    def load(cls, path: str | os.PathLike, family: str, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> "PromptEncoder":
        if family in FLOW_VARIANTS:
            return PipelinePromptEncoder.load(path, family, device, dtype)
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

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


class PipelinePromptEncoder(PromptEncoder):
    """sd3/flux: the pipeline built from its text components alone, encoding with the pipeline's own
    `encode_prompt` (no CFG, one image per prompt, the default max_sequence_length), so the CLIP/T5
    layout, padding and pooling are diffusers' code, not a copy of it."""

    def __init__(self, family: str, pipe, device: torch.device | str = "cpu"):
        names = sorted(n for n in pipe.components if n.startswith("text_encoder"))
        super().__init__(family, [getattr(pipe, n.replace("text_encoder", "tokenizer")) for n in names],
                         [getattr(pipe, n) for n in names], device)
        self.pipe = pipe

    @classmethod
    def load(cls, path: str | os.PathLike, family: str, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> "PipelinePromptEncoder":
        import diffusers

        pipeline_class = getattr(diffusers, flow_variant(family).pipeline_class)
        # Components passed as None are not loaded: no transformer or VAE weights are read.
        pipe = pipeline_class.from_pretrained(os.fspath(path), transformer=None, vae=None, image_encoder=None,
                                              feature_extractor=None, dtype=dtype).to(device)
        for name in pipe.components:
            if name.startswith("text_encoder"):
                getattr(pipe, name).eval().requires_grad_(False)
        return cls(family, pipe, device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        import inspect

        prompts = [str(p) for p in prompts]
        params = inspect.signature(self.pipe.encode_prompt).parameters
        # The same prompt for every encoder; SD3's CFG negatives are not computed (None).
        extra = {k: None for k in ("prompt_2", "prompt_3") if k in params}
        if "do_classifier_free_guidance" in params:
            extra["do_classifier_free_guidance"] = False
        out = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1, **extra)
        # SD3: (embeds, None, pooled, None); FLUX: (embeds, pooled, text_ids).
        embeds, pooled = [o for o in out if o is not None][:2]
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
