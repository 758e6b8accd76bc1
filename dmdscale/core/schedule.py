"""Noise schedules on T integer timesteps, the one interface the DMD2 step and samplers use.

* `NoiseSchedule` (VP, the UNet teachers): a thin layer over a diffusers scheduler's
  `alphas_cumprod`; x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
* `FlowMatchSchedule` (rectified flow, the SD3/FLUX transformers): x_t = (1 - s_t) x0 + s_t eps
  with velocity prediction v = eps - x0, s_t the teacher's shifted sigma of timestep t.
Conversions between a network's native output and x0 run in float64 (to_x0) or float32
(add_noise, target). `schedule_for` picks the class from a diffusers scheduler config.
"""
from __future__ import annotations

import inspect
import math
from types import SimpleNamespace
from typing import Any, Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor, nn

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_PREDICTION_TYPES = ("flow_prediction", "sample")  # velocity eps - x0, or x0


def config_for(scheduler_class: type, config: dict[str, Any]) -> dict[str, Any]:
    """The keys of another scheduler's config that `scheduler_class` takes (diffusers warns
    about the rest), without private keys such as "_use_default_values"."""
    known = inspect.signature(scheduler_class.__init__).parameters
    return {k: v for k, v in config.items() if k in known}


class Schedule(nn.Module):
    """What every schedule offers the step: T integer timesteps, each with an EDM-equivalent
    noise level `sigmas` (increasing in t), and the Karras grid mapped onto them. A module so
    `.to(device)` moves its tables."""

    num_train_timesteps: int
    scheduler_config: dict[str, Any]

    @property
    def sigmas(self) -> Tensor:
        raise NotImplementedError

    def karras_timesteps(self, n: int = 1000, sigma_min: float = 0.002, sigma_max: float = 80.0,
                         rho: float = 7.0) -> Tensor:
        """EDM's sigma grid (Karras et al. 2022, rho 7), each point mapped to the timestep of this
        schedule with the nearest sigma (in log sigma): n timesteps, ascending, with repeats where
        the grid is denser than the schedule. Drawing uniformly by index from it is the noise-level
        distribution of the authors' pixel-space ImageNet code, on a VP model."""
        sigmas = self.sigmas
        ramp = torch.linspace(0, 1, n, dtype=torch.float64, device=sigmas.device)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        grid = (lo + ramp * (hi - lo)) ** rho
        distance = (sigmas.log()[None, :] - grid.log()[:, None]).abs()
        return distance.argmin(dim=1)


class NoiseSchedule(Schedule):
    """VP schedule taken from a diffusers scheduler."""

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

    def sampler(self, num_inference_steps: int) -> DDIMScheduler:
        """The teacher's deterministic many-step sampler on this schedule, fed x0: DDIM (eta 0)."""
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


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent mu, linear in the image's token count (diffusers' FluxPipeline
    `calculate_shift`, the defaults of FLUX.1's scheduler config); the sigma shift is exp(mu)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


class FlowMatchSchedule(Schedule):
    """Rectified flow as diffusers' FlowMatchEulerDiscreteScheduler trains it: timestep t in
    [0, T) has s_t = shift(u) with u = (t + 1) / T and shift(u) = k u / (1 + (k - 1) u), so t = T-1
    is pure noise (s = 1). k is the config's fixed `shift` (SD3: 3.0), or with
    `use_dynamic_shifting` (FLUX) exp(mu) for the training resolution's `image_seq_len` tokens
    (`calculate_shift`): FLUX's exponential time shift at sigma 1 is the same map with k = exp(mu).
    The network's own timestep input is s_t * T (`model_timesteps`)."""

    def __init__(self, scheduler_config: dict[str, Any], image_seq_len: int | None = None):
        super().__init__()
        config = config_for(FlowMatchEulerDiscreteScheduler, dict(scheduler_config))
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        self.scheduler_config = config_for(FlowMatchEulerDiscreteScheduler, scheduler.config)
        c = scheduler.config
        self.num_train_timesteps = T = int(c.num_train_timesteps)
        if c.use_dynamic_shifting:
            if image_seq_len is None:
                raise ValueError("a dynamically shifted flow schedule (FLUX) needs the image's token count")
            self.mu = calculate_shift(image_seq_len, c.base_image_seq_len, c.max_image_seq_len,
                                      c.base_shift, c.max_shift)
            self.shift = math.exp(self.mu)
        else:
            self.mu, self.shift = None, float(c.shift)
        u = torch.arange(1, T + 1, dtype=torch.float64) / T
        self.register_buffer("flow_sigmas", self.shift * u / (1 + (self.shift - 1) * u), persistent=False)

    @property
    def sigmas(self) -> Tensor:
        """s / (1 - s): x_t / (1 - s) = x0 + s / (1 - s) eps, EDM's sigma (inf at t = T-1)."""
        return self.flow_sigmas / (1 - self.flow_sigmas)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The transformer's timestep input for integer timesteps t: s_t * T (float32)."""
        return (self.flow_sigmas[t.long()] * self.num_train_timesteps).float()

    def _s(self, t: Tensor, ndim: int, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.flow_sigmas[t.long()].to(dtype).view((-1,) + (1,) * (ndim - 1))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        s = self._s(t, x0.ndim)
        return ((1 - s) * x0.float() + s * noise.float()).to(x0.dtype)

    def to_x0(self, output: Tensor, x_t: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """Velocity (or x0) -> x0 = x_t - s v, in float64, returned in float32."""
        if prediction_type not in FLOW_PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {FLOW_PREDICTION_TYPES}, got {prediction_type!r}")
        if prediction_type == "sample":
            return output.float()
        s = self._s(t, x_t.ndim, torch.float64)
        return (x_t.double() - s * output.double()).float()

    def target(self, x0: Tensor, noise: Tensor, t: Tensor, prediction_type: str) -> Tensor:
        """The flow-matching target: velocity eps - x0 (or x0), float32."""
        if prediction_type == "flow_prediction":
            return noise.float() - x0.float()
        if prediction_type == "sample":
            return x0.float()
        raise ValueError(f"prediction_type must be one of {FLOW_PREDICTION_TYPES}, got {prediction_type!r}")

    def sampler(self, num_inference_steps: int) -> "FlowX0Sampler":
        return FlowX0Sampler(self, num_inference_steps)


class FlowX0Sampler:
    """The flow teacher's deterministic many-step sampler, fed x0: the Euler step of
    FlowMatchEulerDiscreteScheduler (x' = x_t + (s' - s) v) written with x0, which is the same
    step: x' = (1 - s') x0 + s' eps_hat, eps_hat = (x_t - (1 - s) x0) / s. Timesteps evenly
    spaced from T-1 ("trailing"), ending at s' = 0."""

    def __init__(self, schedule: FlowMatchSchedule, num_inference_steps: int):
        T = schedule.num_train_timesteps
        self.schedule = schedule
        self.timesteps = torch.linspace(T - 1, 0, num_inference_steps + 1, dtype=torch.float64)[:-1].round().long()
        next_t = self.timesteps[1:].tolist() + [None]
        self._next = dict(zip(self.timesteps.tolist(), next_t))

    def step(self, x0: Tensor, t: int, x_t: Tensor) -> SimpleNamespace:
        s = float(self.schedule.flow_sigmas[t])
        nxt = self._next[int(t)]
        s_next = 0.0 if nxt is None else float(self.schedule.flow_sigmas[nxt])
        eps_hat = (x_t.double() - (1 - s) * x0.double()) / s
        return SimpleNamespace(prev_sample=((1 - s_next) * x0.double() + s_next * eps_hat).to(x_t.dtype))


def schedule_for(scheduler_config: dict[str, Any], image_seq_len: int | None = None) -> Schedule:
    """The schedule a diffusers scheduler config describes: flow matching for the FlowMatch
    schedulers (SD3, FLUX), else VP."""
    if str(scheduler_config.get("_class_name", "")).startswith("FlowMatch"):
        return FlowMatchSchedule(scheduler_config, image_seq_len)
    return NoiseSchedule(scheduler_config)


class TimestepSampler(nn.Module):
    """Draws noise levels within a timestep range [low, high]: uniformly in t ("uniform"), or
    uniformly by index on the Karras sigma grid mapped onto the schedule ("karras").

    Both are a table of timesteps drawn from uniformly by index (uniform: every timestep once),
    so a range keeps the table's entries inside it. `draw` takes a function `randint(high, n)`
    for its random indices, so the caller's random stream (e.g. a NoiseStream) decides them.
    """

    KINDS = ("uniform", "karras")

    def __init__(self, schedule: Schedule, kind: str = "uniform"):
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
