"""DMD2 losses: each a short function with its equation. Inputs are batches (B, ...)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def dm_loss(x: Tensor, x0_real: Tensor, x0_fake: Tensor, weight: Tensor | None = None) -> Tensor:
    """Distribution-matching loss for the generator (DMD, eq. 7 with DMD2's normaliser).

        p_real = x - x0_real,  p_fake = x - x0_fake
        grad   = (p_real - p_fake) / mean_{C,H,W} |p_real|      (per sample)
        loss   = 0.5 * mse(x, stopgrad(x - grad))               => d loss / d x = grad / numel

    `x0_real`/`x0_fake` are the teacher's (CFG) and the fake score's x0 at the same noised x;
    they carry no gradient. Descending moves x toward the teacher and away from the fake score.
    `weight` (B,): a per-sample factor on grad (an f-divergence's `f_divergence_weight`).
    """
    x32 = x.float()
    p_real = x32.detach() - x0_real.float()
    p_fake = x32.detach() - x0_fake.float()
    normaliser = p_real.abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    grad = torch.nan_to_num((p_real - p_fake) / normaliser)
    if weight is not None:
        grad = grad * weight.detach().float().view(-1, *[1] * (x.ndim - 1))
    return 0.5 * F.mse_loss(x32, (x32 - grad).detach())


# h(r) of each divergence: the DM gradient of D_f is E[h(r) (s_fake - s_real)] with
# h(r) = f''(r) r^2 and r = p_data / p_student (Xu et al. 2025, table 1).
F_DIVERGENCE_WEIGHTS = {
    "reverse_kl": lambda r: torch.ones_like(r),  # f = -log r: DMD
    "forward_kl": lambda r: r,  # f = r log r
    "jensen_shannon": lambda r: r / (1 + r),  # f = r log r - (1 + r) log((1 + r) / 2)
}


def f_divergence_weight(logits: Tensor, divergence: str, max_logit: float = 10.0) -> Tensor:
    """Per-sample weights (B,) of the DM gradient for `divergence`, from discriminator logits:
    a discriminator trained with the logistic loss has sigmoid(logit) = p / (p + q), so the
    density ratio is r = exp(logit) (clamped to |logit| <= max_logit). Divided by their batch
    mean, so the DM term keeps its overall scale and only its spread over samples changes."""
    r = logits.detach().float().clamp(-max_logit, max_logit).exp()
    h = F_DIVERGENCE_WEIGHTS[divergence](r)
    return h / h.mean().clamp_min(1e-12)


def denoising_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """Fake-score loss: unweighted MSE in the network's own parametrization
    (eps-MSE for eps-prediction UNets, as for SD/SDXL), on the generator's detached output."""
    return F.mse_loss(prediction.float(), target.float())


def gan_critic_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Non-saturating discriminator loss: softplus(D(fake)) + softplus(-D(real)), means."""
    return F.softplus(fake_logits.float()).mean() + F.softplus(-real_logits.float()).mean()


def gan_generator_loss(fake_logits: Tensor) -> Tensor:
    """Non-saturating generator loss: softplus(-D(G(z))).mean()."""
    return F.softplus(-fake_logits.float()).mean()


def pseudo_huber(x: Tensor, y: Tensor) -> Tensor:
    """sqrt(||x - y||^2 + c^2) - c per sample, c = 0.00054 sqrt(numel per sample)
    (Song & Dhariwal 2023); a robust stand-in for LPIPS that needs no pretrained weights."""
    d = x[0].numel()
    c = 0.00054 * math.sqrt(d)
    sq = (x.float() - y.float()).pow(2).flatten(1).sum(1)
    return (torch.sqrt(sq + c * c) - c).mean()


def regression_loss(student_x0: Tensor, teacher_x0: Tensor, metric: str = "pseudo_huber", lowpass: int = 1) -> Tensor:
    """DMD1's regression loss: the student's one-step output for a stored noise against the
    teacher's deterministic many-step output for the same noise. Optional in DMD2. `lowpass`
    > 1 compares both average-pooled by that factor (images; the coarse statistics only)."""
    if lowpass > 1:
        student_x0, teacher_x0 = (F.avg_pool2d(x.float(), lowpass, ceil_mode=True) for x in (student_x0, teacher_x0))
    if metric == "pseudo_huber":
        return pseudo_huber(student_x0, teacher_x0)
    if metric == "mse":
        return F.mse_loss(student_x0.float(), teacher_x0.float())
    raise ValueError(f"loss.regression_metric must be 'pseudo_huber' or 'mse', got {metric!r}")
