"""Train (and cache) a small class-conditional pixel teacher for the digits pipeline.

No digits teacher can be downloaded here, so the pipeline trains one with plain DDPM
(v prediction by default) and saves it as an ordinary diffusers folder. The distillation then loads it
with `load_unet`, the same path a user's own teacher takes.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from dmdscale.data.images import to_model_space

ArrayLike = Any  # numpy array or torch tensor


def _as_tensor(a: ArrayLike) -> torch.Tensor:
    return a.detach().cpu() if torch.is_tensor(a) else torch.from_numpy(np.ascontiguousarray(a))


TRAIN_TIMESTEPS = 1000  # the schedule of the teachers dmdscale trains (DDPM's)


def ddpm_scheduler(prediction_type: str = "v_prediction") -> DDPMScheduler:
    """The teacher's schedule: linear betas (the DDPM choice for pixels in [-1, 1]).

    v, not eps, by default: with linear betas abar_999 = 4e-5, so x0 = (x_t - s eps) / a
    multiplies eps errors by up to 1/a = 156 at high t. Measured on 16x16 digits (600 steps,
    width 32): an eps teacher's 50-step DDIM samples diverged to noise for 32% of seeds
    (50 or 200 steps alike; ancestral DDPM sampling was fine), the same v teacher for none.
    The DM loss reads the teacher's x0 at t up to 980, where the same amplification applies.
    """
    return DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule="linear",
                         prediction_type=prediction_type, clip_sample=False)


def _check_inputs(x: torch.Tensor, labels: torch.Tensor | None, config: dict[str, Any]) -> None:
    """Fail before training, not after minutes of it, on data that does not fit the UNet."""
    res, ch = config.get("sample_size"), config.get("in_channels", 3)
    if ch != x.shape[1] or (res is not None and tuple(x.shape[2:]) != (res, res)):
        raise ValueError(f"images are {tuple(x.shape[1:])} (C, H, W) but the UNet config expects "
                         f"{ch} channels at {res}x{res}")
    n_embeds = config.get("num_class_embeds")
    if n_embeds is None:
        if labels is not None:
            raise ValueError("labels given but the UNet config has no num_class_embeds")
        return
    if labels is None or len(labels) != len(x):
        raise ValueError("a class-conditional UNet needs one label per image")
    if labels.min() < 0 or labels.max() >= n_embeds - 1:
        raise ValueError(f"labels must lie in [0, {n_embeds - 2}] (index {n_embeds - 1} is the null class)")


def _target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The regression target in the scheduler's parametrization (eps, v or x0)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unsupported prediction_type {kind!r}")


def train_teacher(images_uint8_nhwc: ArrayLike, labels: ArrayLike | None, unet_config: dict[str, Any], *,
                  steps: int, batch_size: int, lr: float, seed: int = 0, label_dropout: float = 0.1,
                  ema_decay: float = 0.999, prediction_type: str = "v_prediction",
                  warmup_steps: int | None = None, grad_clip: float = 1.0,
                  progress: bool = True, callback: Callable[[int, float], None] | None = None,
                  ) -> tuple[UNet2DModel, DDPMScheduler]:
    """Plain DDPM training (unweighted MSE on the scheduler's target, uniform t) of a
    UNet2DModel built from `unet_config`. `prediction_type` "v_prediction" (default, see
    `ddpm_scheduler` for why) or "epsilon" (the classic DDPM loss) or "sample".

    Labels are replaced by the null class (the last class embedding) with probability
    `label_dropout`, so the teacher supports classifier-free guidance. Returns the EMA weights
    (diffusers' EMAModel, whose decay warms up as (1+n)/(10+n), capped at `ema_decay`), which
    sample better than the raw weights after short runs. `callback(step, loss)` sees every step.
    """
    torch.manual_seed(seed)  # the UNet's initialisation draws from the global RNG
    rng = torch.Generator().manual_seed(seed)
    x = to_model_space(images_uint8_nhwc)
    y = _as_tensor(labels).long() if labels is not None else None
    _check_inputs(x, y, unet_config)
    null_class = unet_config.get("num_class_embeds", 0) - 1 if y is not None else None

    unet = UNet2DModel.from_config(unet_config).train()
    scheduler = ddpm_scheduler(prediction_type)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01)
    warmup = min(100, steps // 10) if warmup_steps is None else warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    ema = EMAModel(unet.parameters(), decay=ema_decay)
    T = scheduler.config.num_train_timesteps

    bar = tqdm(range(steps), desc="teacher", disable=not progress)
    running = None
    for step in bar:
        idx = torch.randint(len(x), (batch_size,), generator=rng)
        x0 = x[idx]
        noise = torch.randn(x0.shape, generator=rng)
        t = torch.randint(T, (batch_size,), generator=rng)
        cls = None
        if y is not None:
            drop = torch.rand(batch_size, generator=rng) < label_dropout
            cls = torch.where(drop, torch.full_like(y[idx], null_class), y[idx])
        pred = unet(scheduler.add_noise(x0, noise, t), t, class_labels=cls).sample
        loss = F.mse_loss(pred, _target(scheduler, x0, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), grad_clip)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        value = loss.detach().item()
        running = value if running is None else 0.98 * running + 0.02 * value
        if callback is not None:
            callback(step, value)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{running:.4f}")
    ema.copy_to(unet.parameters())
    return unet.eval(), scheduler


def save_teacher(unet: UNet2DModel, scheduler: DDPMScheduler, out_dir: str | os.PathLike) -> Path:
    """A diffusers folder: out_dir/unet (safetensors) and out_dir/scheduler."""
    out = Path(out_dir)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    return out


_NOT_IN_KEY = ("progress", "callback")  # change nothing about the weights


def _train_settings(train_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`train_teacher`'s keyword settings with its defaults filled in, so `seed=0` and an
    omitted seed share one cache entry (and a changed default invalidates it)."""
    params = inspect.signature(train_teacher).parameters
    unknown = set(train_kwargs) - set(params)
    if unknown:
        raise TypeError(f"unknown train_teacher arguments: {sorted(unknown)}")
    return {name: train_kwargs.get(name, p.default) for name, p in params.items()
            if p.kind is p.KEYWORD_ONLY and name not in _NOT_IN_KEY}


def teacher_cache_key(images: ArrayLike, labels: ArrayLike | None, unet_config: dict[str, Any],
                      train_kwargs: dict[str, Any]) -> str:
    """Hash of everything that determines the trained weights: config, training settings and
    the exact data bytes (so a different dataset never reuses a stale teacher)."""
    cfg = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    kw = _train_settings(train_kwargs)
    h = hashlib.sha256(json.dumps({"unet": cfg, "train": kw}, sort_keys=True, default=str).encode())
    for a in (images, labels):
        if a is not None:
            t = _as_tensor(a).contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _is_complete(folder: Path) -> bool:
    return (folder / "unet" / "config.json").is_file() and (folder / "scheduler" / "scheduler_config.json").is_file()


def load_or_train_teacher(cache_root: str | os.PathLike, images: ArrayLike, labels: ArrayLike | None,
                          unet_config: dict[str, Any], **train_kwargs: Any) -> Path:
    """The teacher folder for these inputs under `cache_root`, training it only when missing.

    Trains into a temporary sibling folder and renames it into place, so an interrupted run
    never leaves a half-written cache, and two concurrent runs cannot corrupt each other
    (the loser discards its copy). Also writes `teacher_meta.json` (settings, seconds, loss).
    """
    root = Path(cache_root)
    folder = root / f"teacher-{teacher_cache_key(images, labels, unet_config, train_kwargs)}"
    if _is_complete(folder):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    losses: list[float] = []
    user_cb = train_kwargs.pop("callback", None)

    def record(step: int, loss: float) -> None:
        losses.append(loss)
        if user_cb is not None:
            user_cb(step, loss)

    start = time.perf_counter()
    unet, scheduler = train_teacher(images, labels, unet_config, callback=record, **train_kwargs)
    seconds = time.perf_counter() - start
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-teacher-", dir=root))
    try:
        save_teacher(unet, scheduler, tmp)
        tail = losses[-max(1, len(losses) // 10):]
        meta = {"unet_config": {k: v for k, v in dict(unet_config).items() if not k.startswith("_")},
                "train": _train_settings(train_kwargs),
                "train_seconds": round(seconds, 2), "final_loss": float(np.mean(tail)) if tail else None}
        (tmp / "teacher_meta.json").write_text(json.dumps(meta, indent=2, default=str))
        if folder.exists():  # an incomplete leftover from outside this function
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except OSError:
        if not _is_complete(folder):  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
