"""The flow-matching schedule against diffusers' FlowMatchEulerDiscreteScheduler on random tensors."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dmdscale.core.sampling import teacher_sample
from dmdscale.core.schedule import FlowMatchSchedule, NoiseSchedule, calculate_shift, schedule_for

SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
# FLUX.1-dev's scheduler_config.json: shifted by the image's token count.
FLUX = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
        "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
        "max_image_seq_len": 4096}


def test_fixed_shift_sigmas_are_diffusers_training_sigmas_in_timestep_order():
    ours = FlowMatchSchedule(SD3)
    ref = FlowMatchEulerDiscreteScheduler.from_config(SD3)  # sigmas from t = T-1 down to 0
    torch.testing.assert_close(ours.flow_sigmas.flip(0).float(), ref.sigmas[:1000], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.model_timesteps(torch.arange(1000)).flip(0), ref.timesteps, rtol=1e-5, atol=1e-3)
    assert float(ours.flow_sigmas[999]) == 1.0  # the student's first timestep is pure noise


def test_dynamic_shift_is_fluxs_time_shift_at_the_training_resolution():
    seq_len = 64 * 64  # 1024 px: 128x128 latents, 2x2 patches
    ours = FlowMatchSchedule(FLUX, image_seq_len=seq_len)
    ref = FlowMatchEulerDiscreteScheduler.from_config(FLUX)
    mu = calculate_shift(seq_len)
    assert ours.mu == pytest.approx(mu) and ours.shift == pytest.approx(math.exp(1.15))
    u = torch.arange(1, 1001, dtype=torch.float64) / 1000
    torch.testing.assert_close(ours.flow_sigmas, ref.time_shift(mu, 1.0, u), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="token count"):
        FlowMatchSchedule(FLUX)


def test_add_noise_matches_scale_noise():
    ours = FlowMatchSchedule(SD3)
    ref = FlowMatchEulerDiscreteScheduler.from_config(SD3)
    x0, noise = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    t = torch.tensor([0, 250, 749, 999])
    expected = ref.scale_noise(x0, ref.timesteps[999 - t], noise)
    torch.testing.assert_close(ours.add_noise(x0, noise, t), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [10, 499, 998])
def test_velocity_to_x0_gives_diffusers_euler_step(t):
    """The teacher sampler's step fed to_x0(v) equals diffusers' Euler step fed v."""
    ours = FlowMatchSchedule(SD3)
    ref = FlowMatchEulerDiscreteScheduler.from_config(SD3)
    ref.set_timesteps(sigmas=[float(u) for u in (torch.tensor([t, t // 2]) + 1) / 1000])
    x_t, v = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    expected = ref.step(v, ref.timesteps[0], x_t).prev_sample
    sampler = ours.sampler(2)
    sampler.timesteps, sampler._next = torch.tensor([t, t // 2]), {t: t // 2, t // 2: None}
    x0 = ours.to_x0(v, x_t, torch.full((2,), t), "flow_prediction")
    torch.testing.assert_close(sampler.step(x0, t, x_t).prev_sample, expected, rtol=1e-4, atol=1e-4)


def test_target_inverts_to_x0_and_the_sampler_recovers_a_point_mass():
    ours = FlowMatchSchedule(SD3)
    x0, noise = torch.randn(5, 3), torch.randn(5, 3)
    t = torch.tensor([0, 100, 500, 900, 999])
    x_t = ours.add_noise(x0, noise, t)
    torch.testing.assert_close(ours.to_x0(ours.target(x0, noise, t, "flow_prediction"), x_t, t, "flow_prediction"),
                               x0, rtol=1e-5, atol=1e-5)
    target = torch.randn(2, 3)

    class PointMass(torch.nn.Module):  # a perfect denoiser of a one-point data set
        schedule = ours

        def forward(self, x, t, cond=None, guidance_scale=1.0):
            return target.expand_as(x)

    out = teacher_sample(PointMass(), torch.randn(2, 3), 8)
    torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-5)
    assert ours.sampler(8).timesteps[0] == 999


def test_schedule_for_picks_the_class_from_the_config():
    assert isinstance(schedule_for(SD3), FlowMatchSchedule)
    assert isinstance(schedule_for(dict(NoiseSchedule.ddpm().scheduler_config)), NoiseSchedule)
    with pytest.raises(ValueError, match="prediction_type"):
        FlowMatchSchedule(SD3).to_x0(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), "epsilon")


def test_karras_grid_and_sigmas_are_monotone_on_the_flow_schedule():
    ours = FlowMatchSchedule(SD3)
    assert bool((ours.sigmas[1:] > ours.sigmas[:-1]).all())
    grid = ours.karras_timesteps()
    assert grid.min() >= 0 and grid.max() <= 999 and bool((grid[1:] >= grid[:-1]).all())
