"""Noise schedule: a thin layer over a diffusers scheduler's `alphas_cumprod`.

x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. Conversions between a network's native output
(eps, v or x0) and x0 run in float64 (to_x0) or float32 (add_noise, target).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

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

    @property
    def sigmas(self) -> Tensor:
        """sigma_t = sqrt((1 - abar_t) / abar_t): the noise-to-signal ratio of x_t / sqrt(abar_t)
        (EDM's sigma), increasing in t (float64)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    def karras_timesteps(self, n: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0,
                         rho: float = 7.0) -> Tensor:
        """EDM's sigma grid (Karras et al. 2022, rho 7), each point mapped to the timestep of this
        schedule with the nearest sigma (in log sigma): n timesteps, ascending, with repeats where
        the grid is denser than the schedule. Drawing uniformly by index from it is the noise-level
        distribution of the authors' pixel-space ImageNet code, on a VP model."""
        ramp = torch.linspace(0, 1, n, dtype=torch.float64, device=self.alphas_cumprod.device)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        grid = (lo + ramp * (hi - lo)) ** rho
        distance = (self.sigmas.log()[None, :] - grid.log()[:, None]).abs()
        return distance.argmin(dim=1)

    def _coeffs(self, t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
        abar = self.alphas_cumprod[t.long()].to(torch.float32)
        shape = (-1,) + (1,) * (ndim - 1)
        return abar.sqrt().view(shape), (1 - abar).sqrt().view(shape)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        a, s = self._coeffs(t, x0.ndim)
        return (a * x0.float() + s * noise.float()).to(x0.dtype)

    def to_x0(self, output: Tensor, x_t: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """A network's native output -> x0, computed in float64 and returned in float32.

        At t near 999 eps-prediction divides by sqrt(abar) ~ 0.07 (SD's abar ~ 0.005), so x0
        amplifies the output's own error about 14x; the arithmetic adds none of its own in
        float64, as in the DMD2 authors' get_x0_from_noise (main/utils.py: `.double()` on sample,
        output and alphas_cumprod). float32 out: the generator's x0 feeds its networks again.
        """
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        abar = self.alphas_cumprod[t.long()].view((-1,) + (1,) * (x_t.ndim - 1))
        a, s = abar.sqrt(), (1 - abar).sqrt()
        output, x_t = output.double(), x_t.double()
        if prediction_type == "epsilon":
            x0 = (x_t - s * output) / a
        elif prediction_type == "v_prediction":
            x0 = a * x_t - s * output
        else:
            x0 = output
        return x0.float()

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


class TimestepSampler(nn.Module):
    """Draws noise levels within a timestep range [low, high]: uniformly in t ("uniform"), or
    uniformly by index on the Karras sigma grid mapped onto the schedule ("karras").

    Both are a table of timesteps drawn from uniformly by index (uniform: every timestep once),
    so a range keeps the table's entries inside it. `draw` takes a function `randint(high, n)`
    for its random indices, so the caller's random stream (e.g. a NoiseStream) decides them.
    """

    KINDS = ("uniform", "karras")

    def __init__(self, schedule: NoiseSchedule, kind: str = "uniform"):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"timestep sampler must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        T = schedule.num_train_timesteps
        table = torch.arange(T) if kind == "uniform" else schedule.karras_timesteps().cpu()
        self.register_buffer("table", table.long(), persistent=False)

    def within(self, low: int, high: int) -> Tensor:
        """The table's timesteps in [low, high]; the nearest one when none falls inside."""
        inside = self.table[(self.table >= low) & (self.table <= high)]
        if len(inside) == 0:  # a narrow range between two grid points
            nearest = (self.table - (low + high) / 2).abs().argmin()
            inside = self.table[nearest:nearest + 1]
        return inside

    def draw(self, low: int, high: int, n: int, randint: Callable[[int, int], Tensor]) -> Tensor:
        inside = self.within(low, high)
        return inside[randint(len(inside), n).to(inside.device)]
