"""The schedule layer against diffusers' own scheduler arithmetic."""
import pytest
import torch
from diffusers import DDPMScheduler

from dmdscale.core.schedule import NoiseSchedule


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_add_noise_matches_diffusers(beta_schedule):
    sched = NoiseSchedule.ddpm(beta_schedule)
    ref = DDPMScheduler(beta_schedule=beta_schedule)
    x0, noise = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(sched.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("t", [5, 400, 999])
def test_to_x0_matches_diffusers_step(prediction_type, t):
    sched = NoiseSchedule.ddpm("scaled_linear", beta_start=0.00085, beta_end=0.012)
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        prediction_type=prediction_type, clip_sample=False)
    x_t, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    expected = ref.step(out, t, x_t).pred_original_sample
    got = sched.to_x0(out, x_t, torch.full((2,), t), prediction_type)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_target_is_the_inverse_of_to_x0(prediction_type):
    sched = NoiseSchedule.ddpm("linear")
    x0, noise = torch.randn(5, 2), torch.randn(5, 2)
    t = torch.tensor([3, 100, 500, 900, 990])
    x_t = sched.add_noise(x0, noise, t)
    target = sched.target(x0, noise, t, prediction_type)
    torch.testing.assert_close(sched.to_x0(target, x_t, t, prediction_type), x0, rtol=1e-3, atol=1e-3)


def test_ddim_sampler_starts_from_pure_noise_and_is_deterministic():
    sampler = NoiseSchedule.ddpm("linear").sampler(10)
    assert int(sampler.timesteps[0]) == 999
    assert sampler.config.prediction_type == "sample" and not sampler.config.clip_sample


def test_unknown_prediction_type_is_named():
    sched = NoiseSchedule.ddpm()
    with pytest.raises(ValueError, match="prediction_type"):
        sched.to_x0(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), "flow")


def test_config_builds_other_schedulers_with_the_same_betas():
    from diffusers import LCMScheduler

    schedule = NoiseSchedule(DDPMScheduler(beta_schedule="linear").config)
    other = LCMScheduler.from_config(schedule.scheduler_config)
    torch.testing.assert_close(other.alphas_cumprod.double(), schedule.alphas_cumprod)
