"""Noise schedule: a thin layer over a diffusers scheduler's `alphas_cumprod`.

x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. Conversions between a network's native output
(eps, v or x0) and x0 run in float32 at least, as the reference asks.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import Tensor, nn

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def config_for(scheduler_class: type, config: dict[str, Any]) -> dict[str, Any]:
    """The keys of another scheduler's config that `scheduler_class` takes (diffusers warns
    about the rest), without private keys such as "_use_default_values"."""
    known = inspect.signature(scheduler_class.__init__).parameters
    return {k: v for k, v in config.items() if k in known}


class NoiseSchedule(nn.Module):
    """VP schedule taken from a diffusers scheduler. A module so `.to(device)` moves it."""

    def __init__(self, scheduler_config: dict[str, Any]):
        super().__init__()
        # Any diffusers scheduler's config will do (an exported student's is LCMScheduler's).
        scheduler = DDPMScheduler.from_config(config_for(DDPMScheduler, scheduler_config))
        # Without diffusers' private keys: "_use_default_values" would make another scheduler
        # class built from this config take its own defaults (e.g. LCMScheduler's betas).
        self.scheduler_config = config_for(DDPMScheduler, scheduler.config)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.register_buffer(
            "alphas_cumprod", scheduler.alphas_cumprod.to(torch.float64), persistent=False
        )

    @classmethod
    def ddpm(cls, beta_schedule: str = "linear", num_train_timesteps: int = 1000, **kw: Any):
        return cls(dict(DDPMScheduler(num_train_timesteps=num_train_timesteps,
                                      beta_schedule=beta_schedule, **kw).config))

    def _coeffs(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod[t.long()].to(torch.float32)
        shape = (-1,) + (1,) * (ndim - 1)
        return abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a, s = self._coeffs(t, x0.ndim)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def to_x0(self, output: Tensor, x_t: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """A network's native output -> x0 (float32)."""
        a, s = self._coeffs(t, x_t.ndim)
        output, x_t = output.float(), x_t.float()
        if prediction_type == "epsilon":
            return (x_t - s * output) / a
        if prediction_type == "v_prediction":
            return a * x_t - s * output
        if prediction_type == "sample":
            return output
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """The denoising target in a network's native parametrization (float32)."""
        a, s = self._coeffs(t, x0.ndim)
        if prediction_type == "epsilon":
            return noise.float()
        if prediction_type == "v_prediction":
            return a * noise.float() - s * x0.float()
        if prediction_type == "sample":
            return x0.float()
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")

    def ddim(self, num_inference_steps: int) -> DDIMScheduler:
        """A deterministic DDIM sampler on this schedule that takes x0 as its model output."""
        sampler = DDIMScheduler.from_config(
            self.scheduler_config,
            prediction_type="sample",
            clip_sample=False,
            thresholding=False,
            timestep_spacing="trailing",  # start at t = T-1, i.e. from pure noise
            set_alpha_to_one=True,
        )
        sampler.set_timesteps(num_inference_steps)
        return sampler
