"""toy2d: the analytic teacher is exact, and DMD2 distils it into a 1-step generator."""
from pathlib import Path

import pytest
import torch

from dmdscale.config import load_config
from dmdscale.core.sampling import teacher_sample
from dmdscale.core.schedule import NoiseSchedule
from dmdscale.families.toy2d import energy_distance
from dmdscale.families.toy2d.model import GaussianMixture2D, MixtureDenoiser

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("t", [30, 300, 700])
def test_mixture_denoiser_matches_monte_carlo_posterior_mean(t):
    """E[x0 | x_t] by self-normalised importance sampling over prior draws of x0."""
    mixture, sched = GaussianMixture2D(), NoiseSchedule.ddpm("squaredcos_cap_v2")
    teacher = MixtureDenoiser(mixture, sched)
    g = torch.Generator().manual_seed(0)
    x0_prior = mixture.sample(400_000, g).double()
    abar = sched.alphas_cumprod[t]
    x_t = sched.add_noise(mixture.sample(5, g), torch.randn(5, 2, generator=g), torch.full((5,), t)).double()
    logw = -((x_t[:, None] - abar.sqrt() * x0_prior[None]) ** 2).sum(-1) / (2 * (1 - abar))
    mc = (logw.softmax(1)[..., None] * x0_prior[None]).sum(1)
    exact = teacher(x_t.float(), torch.full((5,), t)).double()
    torch.testing.assert_close(exact, mc, atol=0.03, rtol=0)


def test_teacher_ddim_sampler_reproduces_the_mixture():
    mixture = GaussianMixture2D()
    teacher = MixtureDenoiser(mixture, NoiseSchedule.ddpm("squaredcos_cap_v2"))
    pts = teacher_sample(teacher, torch.randn(3000, 2, generator=torch.Generator().manual_seed(1)), 100)
    shares = mixture.mode_shares(pts)
    assert shares.sum() > 0.97 and shares.min() > 0.09
    assert energy_distance(pts, mixture.sample(3000)) < 0.01


def test_energy_distance_separates_distributions():
    a, b = torch.randn(2000, 2), torch.randn(2000, 2)
    assert energy_distance(a, b) < 0.02 < energy_distance(a, b + 0.5)


def test_config_default_is_the_toy_yaml():
    cfg = load_config(ROOT / "pipelines" / "configs" / "toy2d.yaml")
    assert cfg.generator.timesteps == [999] and cfg.toy2d.num_modes == 8
