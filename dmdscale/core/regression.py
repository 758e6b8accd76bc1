"""The regression stage's step: the generator's one-step output for a stored noise against the
teacher's deterministic many-step output for the same noise and prompt (the DMD2 authors'
pretraining of their SDXL 1-step generator on 10K teacher ODE pairs). Plain torch.

The distance is `regression_loss`'s pseudo-Huber on latents (no weights needed), or LPIPS on
the VAE-decoded images (the authors'), through `DecodedLPIPS`: both latents are decoded by the
teacher's frozen VAE, the generator's with gradients, and compared by a VGG LPIPS network
loaded from a local state dict only.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from dmdscale.config import Config
from dmdscale.core.losses import regression_loss
from dmdscale.core.optim import OptimizedModule
from dmdscale.core.precision import autocast

# A pair row's tensors that are not the generator's conditioning.
PAIR_TENSORS = ("noise", "target")
Distance = Callable[[Tensor, Tensor], Tensor]


class DecodedLPIPS(nn.Module):
    """LPIPS (VGG) between the VAE decodings of two latent batches; a mean over the batch."""

    def __init__(self, vae: nn.Module, lpips_net: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.lpips = lpips_net.eval().requires_grad_(False)

    def decode(self, latent: Tensor) -> Tensor:
        """Latents as the data stage scaled them -> images in [-1, 1]."""
        config = self.vae.config
        shift = config.get("shift_factor") or 0.0
        image = self.vae.decode((latent / config.scaling_factor + shift).to(self.vae.dtype)).sample
        return image.float().clamp(-1, 1)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        with torch.no_grad():
            target = self.decode(teacher)
        return self.lpips(self.decode(student), target).mean()


def load_lpips(weights: str | Path) -> nn.Module:
    """The `lpips` package's VGG LPIPS with every weight (backbone and linear heads) from a local
    state dict; nothing is downloaded (torchvision's ImageNet VGG is not fetched)."""
    from dmdscale.config import ConfigError

    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"regression.lpips_weights: {path} is not a file (save one where the weights can be "
                          f"downloaded: torch.save(lpips.LPIPS(net='vgg').state_dict(), PATH))")
    try:
        import lpips
    except ImportError:
        raise ConfigError("regression.metric 'lpips' needs the lpips package (pip install lpips)") from None
    net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    try:
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"regression.lpips_weights: {path} is not a whole VGG LPIPS state dict: "
                          f"{str(exc).splitlines()[0]}") from None
    return net


def regression_distance(cfg: Config, vae: nn.Module | None = None) -> Distance:
    """The stage's distance (regression.metric); LPIPS needs the teacher's VAE."""
    if cfg.regression.metric == "lpips":
        if vae is None:
            raise ValueError("regression.metric 'lpips' compares decoded images: pass the teacher's VAE")
        return DecodedLPIPS(vae, load_lpips(cfg.regression.lpips_weights))
    return functools.partial(regression_loss, metric="pseudo_huber")


class RegressionStep:
    """Callable: `metrics = step_fn(batch, step)` on a batch of pair rows (noise, target and the
    text embeddings): one generator update towards the teacher's outputs."""

    def __init__(self, cfg: Config, generator_opt: OptimizedModule, distance: Distance,
                 sync_flag: Callable[[bool], bool] = lambda ok: ok, device: torch.device | str = "cpu"):
        self.cfg, self.generator_opt, self.distance, self.sync_flag = cfg, generator_opt, distance, sync_flag
        self.device = torch.device(device)
        self.timestep = cfg.generator.timesteps[0]  # the 1-step student's (pure-noise) input time

    def __call__(self, batch: dict[str, Tensor], step: int) -> dict[str, float]:
        noise, target = batch["noise"], batch["target"]
        cond = {k: v for k, v in batch.items() if k not in PAIR_TENSORS}
        t = torch.full((len(noise),), self.timestep, dtype=torch.long, device=noise.device)
        with autocast(self.device, self.cfg.train.mixed_precision):
            loss = self.distance(self.generator_opt.module(noise, t, cond), target)
        metrics = {"loss_regression": float(loss.detach())}
        if not self.sync_flag(bool(torch.isfinite(loss.detach()))):  # skipped on every rank alike
            self.generator_opt.zero_grad()
            return metrics | {"nonfinite_generator": 1.0}
        self.generator_opt.backward(loss)
        norm = self.generator_opt.step()
        return metrics | {"grad_norm_generator": norm, "nonfinite_generator": float(not math.isfinite(norm))}
