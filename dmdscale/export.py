"""The distilled student as a diffusers folder that stock diffusers loads and samples: no
dmdscale import, no custom class, the trained timesteps from an ordinary call.

What every family's export shares; each family writes its own folder with these
(`dmdscale.families.<name>.export`). Pixel UNets (unet2d): unet/ + scheduler/. Text-to-image
(sd15, sdxl): a whole pipeline folder. Both hold:

* a stock `LCMScheduler`, whose step is the student's sampler (x0 from the UNet, re-noised to
  the next timestep), configured so the student's trained timesteps are what
  `num_inference_steps=len(timesteps)` yields when they lie on LCM's evenly spaced grid
  ([999] and [999, 749, 499, 249] with `original_inference_steps` 1 and 4), else passed as
  `timesteps=[...]` (the 1-step SDXL student at 399); `sampling_call` gives the call, which
  dmdscale.json (`call`) and the model card record;
* guidance off (pipelines only): every stock SD/SDXL pipeline skips CFG when
  `unet.config.time_cond_proj_dim` is set (how LCM-distilled UNets are packaged). The exported
  UNet has one, with an all-zero `time_embedding.cond_proj`, so the guidance embedding the
  pipeline feeds it adds exactly 0: outputs equal the trained UNet's for any guidance_scale;
* a model card (README.md, Hub format) written after the evaluation (`write_model_card`);
* nothing of the machine it was made on: no credential and no local absolute path in any file
  (`dmdscale.redact.scrub(..., public=True)`: the card names a local teacher by its folder's own
  name, a Hub cache snapshot by its hub id; `_name_or_path`, where save_pretrained says each part
  was loaded from, is left out of the JSON files, see `scrub_folder`);
* optionally fp16 variant weights beside the fp32 ones (`variant="fp16"`).

LoRA runs also write the adapter for the teacher pipeline's `load_lora_weights`, in peft's key
layout (`lora/`) and in kohya's, which ComfyUI and A1111-style tools read (`lora_kohya/`).

Flow-matching transformers (sd3, flux) write a `StableDiffusion3Pipeline` or `FluxPipeline`
folder with a stock FlowMatchEulerDiscreteScheduler stepping as the student's sampler,
dmdscale.json, the model card and, for LoRA runs, `lora/` (`dmdscale.families.flow.export`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from diffusers import LCMScheduler, UNet2DConditionModel

from dmdscale.core.schedule import config_for
from dmdscale.redact import public_name, public_text, scrub

__all__ = ["STUDENT_DIR", "STUDENT_INFO", "guidance_free_unet", "lora_state_dict", "merged_unet", "sampling_call",
           "save_lora", "scrub_folder", "student_scheduler", "flow_student_scheduler", "save_fp16_variant", "write_model_card", "write_student_info"]

logger = logging.getLogger(__name__)

GUIDANCE_EMBED_DIM = 256  # any width works: the projection reading it is all zeros
# LCM's boundary condition mixes the input into its x0: denoised = c_out * x0 + c_skip * x_t.
# The student predicts x0 outright, so take c_skip -> 0, c_out -> 1: with this scaling c_skip is
# < 3e-13 for every t >= 1 and c_out rounds to 1.0 in float32 (the default 10 leaves ~1e-7).
X0_TIMESTEP_SCALING = 1e6
STUDENT_DIR = "student"  # the exported student in a run folder
KOHYA_LORA_FILE = "pytorch_lora_weights.safetensors"
STUDENT_INFO = "dmdscale.json"  # timesteps, the sampling call, family: what dmdscale's own tools read
# Where save_pretrained says a part was loaded from (diffusers, transformers configs): a local path.
LOADED_FROM_KEYS = ("_name_or_path", "name_or_path")


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence a logger's warnings for a moment (LCM warns about any schedule not starting at
    T-1, e.g. the one-step student's [399], which is right for a student trained on it)."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _lcm_grid(num_train_timesteps: int, steps: int) -> list[int]:
    """What LCMScheduler yields for num_inference_steps == original_inference_steps == steps."""
    k = num_train_timesteps // steps
    return [i * k - 1 for i in range(steps, 0, -1)]


def sampling_call(timesteps: list[int], num_train_timesteps: int = 1000) -> dict[str, Any]:
    """The keyword arguments a stock pipeline (or `LCMScheduler.set_timesteps`) takes to run the
    trained timesteps: `num_inference_steps` where they are LCM's grid, else `timesteps`."""
    steps = [int(t) for t in timesteps]
    if steps == _lcm_grid(num_train_timesteps, len(steps)):
        return {"num_inference_steps": len(steps)}
    return {"timesteps": steps}


def student_scheduler(teacher_scheduler_config: dict[str, Any], timesteps: list[int]) -> LCMScheduler:
    """A stock LCMScheduler on the teacher's noise schedule (betas, prediction_type, ...) stepping
    like the student's sampler: no clipping or thresholding, pure x0, and `sampling_call` giving
    exactly the trained timesteps (checked here, not at sampling time)."""
    config = config_for(LCMScheduler, dict(teacher_scheduler_config))
    n = int(config.get("num_train_timesteps", 1000))
    call = sampling_call(timesteps, n)
    config |= {"original_inference_steps": call.get("num_inference_steps", n), "clip_sample": False,
               "thresholding": False, "timestep_scaling": X0_TIMESTEP_SCALING}
    scheduler = LCMScheduler.from_config(config)
    with _quiet(LCMScheduler.__module__):
        scheduler.set_timesteps(**call)
    if scheduler.timesteps.tolist() != [int(t) for t in timesteps]:
        raise ValueError(f"LCMScheduler gives {scheduler.timesteps.tolist()} for {call}, not the trained {timesteps}")
    return scheduler


def guidance_free_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """`unet` with `time_cond_proj_dim` set and a zero `cond_proj`: pipelines then skip CFG and
    the guidance embedding they pass adds exactly 0. Shares all other weights with `unet`."""
    dim = unet.config.time_cond_proj_dim or GUIDANCE_EMBED_DIM
    with torch.device("meta"):  # no second random init of a multi-GB UNet
        out = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": dim})
    missing, unexpected = out.load_state_dict(unet.state_dict(), strict=False, assign=True)
    allowed = {"time_embedding.cond_proj.weight", "time_embedding.cond_proj.bias"}
    if set(missing) - allowed or unexpected:
        raise ValueError(f"the student UNet's weights do not fit its config (merge a LoRA first with "
                         f"merged_unet): missing {missing}, unexpected {unexpected[:5]}")
    proj = out.time_embedding.cond_proj
    like = unet.conv_in.weight
    for name, p in list(proj.named_parameters()):  # weight (and a bias, should a version add one)
        setattr(proj, name, torch.nn.Parameter(torch.zeros(p.shape, dtype=like.dtype, device=like.device),
                                               requires_grad=False))
    if any(t.is_meta for t in [*out.parameters(), *out.buffers()]):
        raise RuntimeError("guidance_free_unet left meta tensors: this diffusers UNet has state outside its state dict")
    return out.eval()


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """The peft state dict of `unet`'s LoRA adapter (added with `unet.add_adapter`)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)


def merged_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A plain UNet (no peft layers) with `unet`'s LoRA merged into its weights, at the adapter's
    lora_alpha / r scale; `unet` itself is left untouched (a copy is merged)."""
    import copy

    out = copy.deepcopy(unet)
    out.fuse_lora()
    out.unload_lora()
    return out


def _lora_metadata(config: Any) -> dict[str, Any]:
    """A LoraConfig (or its dict) as save_lora_weights' metadata: JSON-serialisable."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    # public: peft's base_model_name_or_path names where the base model was loaded from
    return scrub({k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}, public=True)


def scrub_folder(out: Path) -> None:
    """Leave nothing of this machine in the JSON files of a student folder about to be published:
    drop `_name_or_path` (diffusers and transformers write where each part was loaded from, here
    the teacher's local folder; from_pretrained sets it again on loading) from every one, and
    pass the other values of the rest (model and scheduler configs, model_index.json,
    dmdscale.json) through `scrub(..., public=True)`. Tokenizer files keep their strings verbatim
    (`bos_token`, `</w>` are no secret and no path); weight maps and files over 1 MiB (token
    tables) are not read; a file is rewritten only if something changed."""
    for path in sorted(out.rglob("*.json")):
        if path.name.endswith(".index.json") or path.stat().st_size > 1 << 20:
            continue  # weight maps, token tables: no place of this machine in them
        before = json.loads(path.read_text())
        if not isinstance(before, dict):
            continue
        after = {k: v for k, v in before.items() if k not in LOADED_FROM_KEYS}
        if not path.name.startswith(("tokenizer", "special_tokens", "added_tokens", "vocab")):
            after = scrub(after, public=True)
        if after != before:
            path.write_text(json.dumps(after, indent=2) + "\n")


def write_student_info(out: Path, timesteps: list[int], call: dict[str, Any], family: str,
                guidance_scale: float = 1.0, resolution: int | None = None) -> None:
    """`guidance_scale`: what the student runs at (1.0: no CFG; flux: its embedded guidance);
    `resolution`: the trained one, where sampling depends on it (flux's timestep shift)."""
    info = {"timesteps": [int(t) for t in timesteps], "call": call, "guidance_scale": guidance_scale, "family": family}
    (out / STUDENT_INFO).write_text(json.dumps(scrub(info | ({"resolution": resolution} if resolution else {}),
                                                     public=True), indent=2) + "\n")


def save_lora(pipeline_class: type, out: Path, state_dict: dict[str, torch.Tensor], config: Any,
               component: str = "unet") -> None:
    """out/lora: peft's key format (lora_A / lora_B), which load_lora_weights reads as is (not
    convert_state_dict_to_diffusers: it rewrites attention keys only, and the loader then drops
    those from a dict that also holds conv / ff keys in peft format). For UNets also
    out/lora_kohya: the same adapter in kohya's keys (lora_unet_..., lora_down / lora_up /
    alpha), converted by diffusers' own convert_state_dict_to_kohya, for ComfyUI and A1111-style
    tools. `component`: the pipeline's denoiser ("unet", or "transformer" for sd3/flux)."""
    import inspect

    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    meta = _lora_metadata(config)
    kwargs: dict[str, Any] = {f"{component}_lora_layers": state_dict}
    if f"{component}_lora_adapter_metadata" in inspect.signature(pipeline_class.save_lora_weights).parameters:
        kwargs[f"{component}_lora_adapter_metadata"] = meta
    elif meta.get("lora_alpha", meta.get("r")) != meta.get("r"):  # older diffusers read no alpha back
        logger.warning("this diffusers cannot save lora_alpha: load_lora_weights will scale the LoRA by 1, "
                       "not lora_alpha / r")
    pipeline_class.save_lora_weights(out / "lora", safe_serialization=True, **kwargs)
    if component != "unet":  # kohya's converter knows UNet keys only
        return
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in state_dict.items()})
    # The converter writes alpha = rank (scale 1); the adapter was trained at lora_alpha / r.
    alpha = float(meta.get("lora_alpha", meta.get("r")))
    kohya |= {k: torch.tensor(alpha) for k in kohya if k.endswith(".alpha")}
    (out / "lora_kohya").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(out / "lora_kohya" / KOHYA_LORA_FILE))


def _front_matter_of(teacher: str | os.PathLike) -> dict[str, Any]:
    """The YAML front matter of a local teacher folder's model card (README.md), if any."""
    card = Path(os.fspath(teacher)).expanduser() / "README.md"
    if not card.is_file():
        return {}
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return {}
    head = text.split("---", 2)
    try:
        meta = yaml.safe_load(head[1]) if len(head) == 3 else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def write_model_card(folder: str | os.PathLike, *, family: str, teacher: str, timesteps: list[int],
                     usage: str, metrics: dict[str, Any], config: dict[str, Any], pipeline_tag: str) -> Path:
    """README.md in the exported student's folder, in the Hub's format: YAML front matter
    (library, pipeline tag, base model, tags, the teacher's license when its folder's card has
    one), then the teacher, family, trained timesteps, the exact sampling call (`usage`, code),
    the run's figures and its training config.

    The card is published: `metrics` and `config` go through `scrub(..., public=True)` and the
    whole text through `public_text`, so it holds no credential
    (`scale.storage_path: "s3://b/r?secret_key=***"`) and no local absolute path. The
    teacher is named by its hub id (given as one, or a Hub cache snapshot) or else its folder's
    own name; other local paths (config values, the `usage` code) by their last part."""
    folder = Path(folder)
    meta: dict[str, Any] = {"library_name": "diffusers", "pipeline_tag": pipeline_tag,
                            "tags": ["dmd2", "distillation", "few-step", family]}
    named = public_name(teacher)
    if "/" in named and "://" not in named:
        meta["base_model"] = named  # a hub id, or the hub id of a Hub cache snapshot
    license_ = _front_matter_of(teacher).get("license")
    if license_:
        meta["license"] = license_
    meta["dmdscale"] = {"family": family, "timesteps": [int(t) for t in timesteps]}
    metrics, config, teacher = scrub(metrics, public=True), scrub(config, public=True), named
    figures = "\n".join(f"| `{k}` | {v:.4g} |" if isinstance(v, float) else f"| `{k}` | {v} |"
                        for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool))
    settings = "\n".join(f"{k}: {json.dumps(v)}" for k, v in config.items())
    text = f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# {len(timesteps)}-step DMD2 student of `{teacher}`

Distilled with [DMD2](https://arxiv.org/abs/2405.14867) (distribution matching distillation with
a GAN term and a two time-scale update rule) by dmdscale, from the {family} teacher `{teacher}`.
It samples in {len(timesteps)} step(s) at the trained timesteps {[int(t) for t in timesteps]},
without classifier-free guidance (the teacher's guidance is distilled into it).

## Sampling, with stock diffusers

`"{folder.name}"` below is this folder's own name: use its path where it lies now, or its Hub
repo id. No dmdscale is needed.

```python
{usage.strip()}
```

## The run's figures

| figure | value |
|---|---|
{figures}

## Training config

```yaml
{settings}
```
"""
    path = folder / "README.md"
    path.write_text(public_text(text))
    return path


def flow_student_scheduler(teacher_scheduler_config: dict[str, Any], timesteps: list[int], image_seq_len: int, *,
                           pipeline_spaces_sigmas: bool,
                           guidance_off: dict[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    """(a stock FlowMatchEulerDiscreteScheduler stepping like the student's sampler, the pipeline
    call that runs exactly the trained timesteps).

    The scheduler is the teacher's (shift, dynamic shifting) with `stochastic_sampling`: each step
    re-noises the model's x0 to the next sigma with fresh noise, which is the student's sampler
    (`dmdscale.core.sampling.sample`); its last step returns x0. The call is
    `num_inference_steps=N` where the pipeline's own spacing gives the trained sigmas (e.g. one step
    at t = 999, sigma 1; FLUX's 4 steps [999, 749, 499, 249]), else `sigmas=[...]`, the unshifted
    values the pipeline shifts onto them; checked here, not at sampling time.
    `pipeline_spaces_sigmas`: the pipeline passes its own linear sigmas for a step count (FLUX,
    Qwen-Image) rather than letting the scheduler space them (SD3). `guidance_off`: what the call
    adds so a CFG pipeline runs one pass around the guidance-distilled student (sd3:
    guidance_scale=1.0, its default would be 7.0); None keeps the pipeline's default (flux's
    embedded guidance, which the student was trained at). A `shift_terminal` (Qwen-Image) only
    re-spaces the teacher's many-step sigmas: the student's scheduler drops it so its steps land
    on the trained sigmas."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dmdscale.core.schedule import FlowMatchSchedule

    config = config_for(FlowMatchEulerDiscreteScheduler, dict(teacher_scheduler_config)) | {"stochastic_sampling": True}
    if config.get("shift_terminal"):
        config["shift_terminal"] = None
    schedule = FlowMatchSchedule(config, image_seq_len)
    trained = schedule.flow_sigmas[torch.tensor(timesteps)].float()
    mu = {"mu": schedule.mu} if schedule.mu is not None else {}
    n = len(timesteps)

    def sigmas_for(**call: Any) -> torch.Tensor:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        if "sigmas" in call:
            scheduler.set_timesteps(sigmas=call["sigmas"], **mu)
        elif pipeline_spaces_sigmas:  # FluxPipeline: its own linear sigmas for a step count
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), **mu)
        else:
            scheduler.set_timesteps(n, **mu)
        return scheduler.sigmas[:-1]

    call: dict[str, Any] = {"num_inference_steps": n}
    if not torch.allclose(sigmas_for(**call), trained, atol=1e-5):
        call = {"sigmas": [(int(t) + 1) / schedule.num_train_timesteps for t in timesteps]}
        if not torch.allclose(sigmas_for(**call), trained, atol=1e-5):
            raise ValueError(f"FlowMatchEulerDiscreteScheduler gives {sigmas_for(**call).tolist()} for {call}, "
                             f"not the trained sigmas {trained.tolist()}")
    call |= guidance_off or {}
    return FlowMatchEulerDiscreteScheduler.from_config(config), call


def save_fp16_variant(out: Path) -> None:
    """fp16 weights beside the fp32 ones in an exported pipeline folder (`from_pretrained(out,
    variant="fp16", dtype=torch.float16)`), from a copy read back in fp16: casting the pipeline in
    place would round the caller's network. Every JSON stays the fp32 save's: transformers writes
    the cast dtype into text_encoder/config.json, and a plain `from_pretrained(out)` would then load
    an fp16 text encoder beside an fp32 network and fail on its first matmul."""
    from diffusers import DiffusionPipeline

    configs = {path: path.read_bytes() for path in Path(out).rglob("*.json")}
    with _quiet("diffusers"):
        half = DiffusionPipeline.from_pretrained(out, dtype=torch.float16)
    half.save_pretrained(out, safe_serialization=True, variant="fp16")
    for path, text in configs.items():
        path.write_bytes(text)
