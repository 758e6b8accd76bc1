"""toy2d: a mixture of isotropic Gaussians whose exact denoiser is the (perfect) teacher.

Because E[x0 | x_t] is known in closed form under the VP schedule, any gap between the
student and the data is the distillation's error, not the teacher's.
"""
from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import Tensor, nn

from dmdscale.core.schedule import NoiseSchedule
from dmdscale.core.networks import Cond, Denoiser


class GaussianMixture2D:
    """`num_modes` equal isotropic Gaussians (std `mode_std`) with means on a circle."""

    def __init__(self, num_modes: int = 8, mode_std: float = 0.1, radius: float = 2.0):
        angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
        self.means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)  # (K, 2)
        self.std = mode_std

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        k = torch.randint(len(self.means), (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.means[k] + self.std * noise).float()

    def mode_shares(self, points: Tensor, within_std: float = 3.0) -> Tensor:
        """Share of all points lying within `within_std` std of each mode, shape (K,)."""
        d = torch.cdist(points.double(), self.means)  # (N, K)
        dist, nearest = d.min(dim=1)
        inside = dist <= within_std * self.std
        counts = torch.bincount(nearest[inside], minlength=len(self.means))
        return counts.double() / len(points)


class MixtureDenoiser(Denoiser):
    """The exact E[x0 | x_t] of a Gaussian mixture, in float64.

    Given component k, x_t ~ N(a mu_k, v I) with v = a^2 s^2 + b^2, and
    E[x0 | x_t, k] = mu_k + (a s^2 / v)(x_t - a mu_k); the posterior weights over k are the
    softmax of the component log-likelihoods.
    """

    prediction_type = "sample"

    def __init__(self, mixture: GaussianMixture2D, schedule: NoiseSchedule):
        super().__init__(schedule)
        self.register_buffer("means", mixture.means.clone(), persistent=False)
        self.std = mixture.std

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        abar = self.schedule.alphas_cumprod[t.long()].view(-1, 1)  # float64
        a, b2 = abar.sqrt(), 1 - abar
        v = a**2 * self.std**2 + b2  # (B, 1)
        x = x_t.double()
        centred = x[:, None, :] - a[:, None, :] * self.means[None]  # (B, K, 2)
        logits = -(centred**2).sum(-1) / (2 * v)  # (B, K)
        w = logits.softmax(dim=1)
        post = self.means[None] + (a * self.std**2 / v)[:, None, :] * centred  # (B, K, 2)
        return (w[..., None] * post).sum(1).to(x_t.dtype)


class MLPDenoiser(Denoiser):
    """A small MLP on (x_t, timestep embedding); its last hidden layer is the bottleneck the
    discriminator head reads. Used for the generator and the fake score.

    It predicts v, not x0: x0 = a x_t - s v keeps the identity at low noise (an x0-predicting
    MLP blurs it, and the fake score's low-noise x0 is what the DM gradient sharpens modes with)
    and stays well conditioned at t = T-1, unlike eps prediction.
    """

    prediction_type = "v_prediction"

    def __init__(self, schedule: NoiseSchedule, dim: int = 2, hidden_dim: int = 256,
                 num_layers: int = 3, time_dim: int = 64):
        super().__init__(schedule)
        self.time_dim = time_dim
        layers: list[nn.Module] = [nn.Linear(dim + time_dim, hidden_dim), nn.SiLU()]
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.SiLU()]
        self.trunk = nn.Sequential(*layers)
        self.out = nn.Linear(hidden_dim, dim)
        self.hidden_dim = hidden_dim
        self.time_embedding = nn.Identity()  # no weights: the point a step-conditioned critic adds to

    def time_embedding_layer(self) -> tuple[nn.Module, int]:
        return self.time_embedding, self.time_dim

    def features(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        emb = self.time_embedding(get_timestep_embedding(t, self.time_dim, flip_sin_to_cos=True, downscale_freq_shift=0))
        return self.trunk(torch.cat([x_t, emb.to(x_t.dtype)], dim=1))

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        return self.out(self.features(x_t, t, cond))
