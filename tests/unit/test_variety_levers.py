"""Issue 34's levers for a student that keeps its teacher's variety: f-divergence weights on the
DM gradient, the fake score on the DM term's noise levels, the GAN weight gated on the
discriminator's accuracy (and capped), and a low-passed, annealed regression anchor."""
import math

import pytest
import torch

from dmdscale.config import ConfigError, build_config
from dmdscale.core.losses import dm_loss, f_divergence_weight, regression_loss
from dmdscale.core.step import Batch
from tests.unit.test_step import make_step

GAN = {"loss.gan_generator_weight": 0.1, "loss.gan_critic_weight": 0.1}


def test_f_divergence_weights_follow_the_density_ratio():
    logits = torch.tensor([-2.0, 0.0, 1.0, 3.0])
    assert torch.equal(f_divergence_weight(logits, "reverse_kl"), torch.ones(4))
    forward = f_divergence_weight(logits, "forward_kl")
    r = logits.exp()
    assert torch.allclose(forward, r / r.mean()) and math.isclose(float(forward.mean()), 1.0, rel_tol=1e-6)
    js = f_divergence_weight(logits, "jensen_shannon")
    assert torch.allclose(js, (r / (1 + r)) / (r / (1 + r)).mean())
    # Both weigh the samples the discriminator finds real-like (the student under-covers) up,
    # JS less steeply than forward KL; a huge logit is clamped, not inf.
    assert (js.diff() > 0).all() and js.max() / js.min() < forward.max() / forward.min()
    assert torch.isfinite(f_divergence_weight(torch.tensor([1e4, 0.0]), "forward_kl")).all()


def test_a_per_sample_weight_scales_each_samples_dm_gradient():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    real, fake = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    plain, = torch.autograd.grad(dm_loss(x, real, fake), x)
    weight = torch.tensor([0.0, 1.0, 2.5])
    weighted, = torch.autograd.grad(dm_loss(x, real, fake, weight), x)
    assert torch.allclose(weighted, plain * weight.view(3, 1, 1, 1))


def test_a_divergence_needs_the_discriminator():
    with pytest.raises(ConfigError, match=r"loss.divergence: 'forward_kl' .* \(loss.gan_critic_weight > 0\)"):
        build_config({}, ["loss.divergence=forward_kl"])
    build_config({}, ["loss.divergence=jensen_shannon", "loss.gan_critic_weight=0.01"])


def test_the_dm_term_is_weighted_by_the_discriminator_under_an_f_divergence():
    step, _, critic, mixture = make_step({**GAN, "loss.divergence": "forward_kl"})
    calls = []
    forward = critic.forward

    def spy(x_t, t, cond=None):
        out = forward(x_t, t, cond)
        calls.append(out)
        return out

    critic.forward = spy
    m = step(Batch(mixture.sample(16)), 0)
    assert m["dm_weight_max"] >= 1.0 and len(calls) >= 2  # the DM term's ratio, then the GAN term
    plain, _, _, _ = make_step(GAN)
    assert "dm_weight_max" not in plain(Batch(mixture.sample(16)), 0)


def test_the_fake_score_can_train_on_the_dm_noise_levels():
    seen = {}
    for where in ("uniform", "dm"):
        step, _, critic, mixture = make_step({"loss.fake_score_timesteps": where, "loss.dm_min_step": 400,
                                              "loss.dm_max_step": 600, "train.batch_size": 256})
        predict = critic.fake_score.predict

        def spy(x_t, t, cond=None, _predict=predict, _where=where):
            seen.setdefault(_where, []).append(t.clone())
            return _predict(x_t, t, cond)

        critic.fake_score.predict = spy
        step(Batch(mixture.sample(256)), 1)  # a critic-only iteration
    dm, uniform = torch.cat(seen["dm"]), torch.cat(seen["uniform"])
    assert dm.min() >= 400 and dm.max() <= 600
    assert uniform.min() < 400 and uniform.max() > 600


def test_the_gan_weight_is_gated_on_the_discriminators_accuracy_and_capped():
    step, _, _, mixture = make_step({**GAN, "loss.gan_gate_accuracy": 0.75})
    m = step(Batch(mixture.sample(16)), 0)  # no critic update yet: not measured, no GAN
    assert m["gan_gate"] == 0.0 and m["gan_weight"] == 0.0 and 0 <= m["d_accuracy"] <= 1
    for accuracy, gate in ((0.5, 0.0), (0.6, 0.4), (0.75, 1.0), (0.9, 1.0), (0.3, 0.0)):
        step.d_accuracy = accuracy
        assert math.isclose(step.gan_gate(), gate, abs_tol=1e-9)
    step.d_accuracy = 0.6
    assert math.isclose(step(Batch(mixture.sample(16)), 5)["gan_weight"], 0.1 * 0.4, rel_tol=1e-6)
    capped, _, _, _ = make_step({**GAN, "loss.gan_grad_ratio": 100.0, "loss.gan_weight_cap": 0.02})
    assert capped(Batch(mixture.sample(16)), 0)["gan_weight"] <= 0.02


def test_the_running_accuracy_counts_real_above_and_generated_below_zero():
    step, _, _, _ = make_step({**GAN, "loss.gan_gate_accuracy": 0.8})
    assert step._track_accuracy(torch.tensor([1.0, 2.0, -1.0, 3.0]), torch.tensor([-1.0, 1.0, -2.0, -3.0])) == 0.75
    assert step.d_accuracy == 0.75
    step._track_accuracy(torch.tensor([-1.0] * 4), torch.tensor([1.0] * 4))  # all wrong
    assert math.isclose(step.d_accuracy, 0.9 * 0.75)


def test_a_low_passed_regression_sees_only_the_coarse_image():
    torch.manual_seed(0)
    target = torch.randn(2, 1, 8, 8)
    checker = torch.ones(8, 8)
    checker[::2, 1::2] = checker[1::2, ::2] = -1  # zero mean in every 2x2 cell
    detail = target + 0.5 * checker
    assert regression_loss(detail, target, "mse", lowpass=2) < 1e-10 < regression_loss(detail, target, "mse")
    assert regression_loss(target + 0.5, target, "mse", lowpass=2) > 0.2  # a brightness shift is seen


def test_the_regression_weight_anneals_to_zero():
    step, _, _, mixture = make_step({"loss.regression_weight": 1.0, "loss.regression_anneal_steps": 10},
                                    regression=True)
    weights = []
    for i in (0, 5, 10, 15):
        m = step(Batch(mixture.sample(16)), i)
        weights.append(m.get("regression_weight", 0.0))
    assert weights == [1.0, 0.5, 0.0, 0.0]


# -- multi-step students: per-row step draws and per-step noise bands -------------------------------
FOUR = {"generator.timesteps": [999, 499, 249, 99]}


def test_row_steps_hold_every_step_in_equal_shares_and_split_over_ranks():
    from dmdscale.core.sampling import row_steps

    ks = row_steps(7, 4, 0, 16)
    assert torch.bincount(ks, minlength=4).tolist() == [4, 4, 4, 4]
    halves = torch.cat([row_steps(7, 4, 0, 8, rank=r, world_size=2) for r in (0, 1)])
    assert torch.equal(halves, ks)
    assert not all(torch.equal(row_steps(s, 4, 0, 16), ks) for s in range(8))  # the offset is drawn per step


def test_rows_simulate_to_their_own_depth_calling_the_generator_on_active_rows_only():
    from dmdscale.core.sampling import backward_simulate_rows
    from dmdscale.core.schedule import NoiseSchedule

    schedule, times = NoiseSchedule.ddpm(), [999, 499, 249, 99]
    seen = []

    def generator(x, t, cond):
        seen.append((len(x), int(t[0])))
        return torch.zeros_like(x)

    ks = torch.tensor([0, 1, 2, 3, 3, 0])
    x, t = backward_simulate_rows(generator, schedule, times, ks, (6, 2), rng=torch.Generator().manual_seed(0))
    assert t.tolist() == [999, 499, 249, 99, 99, 999]
    assert seen == [(4, 999), (3, 499), (2, 249)]  # depth i runs the rows with k > i
    # A row at depth k is x0 = 0 re-noised to t_k: sqrt(1 - abar_t) * noise, smaller at lower t.
    assert x[3].norm() < x[1].norm() < x[0].norm() + 5


def test_a_row_step_draw_trains_every_step_in_one_batch_with_a_per_row_critic():
    step, _, critic, mixture = make_step({**FOUR, **GAN, "generator.step_draw": "row", "train.batch_size": 16})
    x_in, t_in = step.generator_input(Batch(mixture.sample(16)), 3)
    assert sorted(set(t_in.tolist())) == [99, 249, 499, 999]
    assert torch.bincount(step.row_steps_of(t_in), minlength=4).tolist() == [4, 4, 4, 4]
    m = step(Batch(mixture.sample(16)), 0)
    assert math.isfinite(m["loss_dm"]) and math.isfinite(m["loss_fake_score"])
    with pytest.raises(ConfigError, match="generator.step_draw: 'row' .* rollout.mode=inline"):
        build_config({}, {**FOUR, "generator.step_draw": "row", "rollout.mode": "actors"})


def test_a_step_conditioned_critic_takes_one_step_per_row():
    from dmdscale.core.schedule import NoiseSchedule
    from dmdscale.core.networks import Critic
    from dmdscale.models.heads import MLPHead
    from dmdscale.families.toy2d.model import MLPDenoiser

    torch.manual_seed(0)
    critic = Critic(MLPDenoiser(NoiseSchedule.ddpm(), 2, 16, 2), MLPHead(16, 16), num_steps=2)
    torch.nn.init.normal_(critic.step_embedding.weight)
    x, t = torch.randn(2, 2), torch.tensor([500, 500])
    with critic.at_step(torch.tensor([0, 1])):
        both = critic(x, t)
    for k in (0, 1):
        with critic.at_step(k):
            assert torch.allclose(critic(x, t)[k], both[k])


def test_noise_bands_keep_each_steps_levels_between_its_timestep_and_the_next():
    step, _, _, mixture = make_step({**FOUR, "loss.step_noise_bands": True, "train.batch_size": 64})
    step.band_k = torch.arange(64) % 4
    t = step.draw_t(step.dm_timesteps, 20, 980, 64)
    for k, (low, high) in enumerate([(499, 980), (249, 499), (99, 249), (20, 99)]):
        rows = t[step.band_k == k]
        assert rows.min() >= low and rows.max() <= high, (k, rows)
    step.band_k = None
    assert step.draw_t(step.dm_timesteps, 20, 980, 64).max() > 499  # without bands: the whole range
    m = make_step({**FOUR, **GAN, "loss.step_noise_bands": True})[0](Batch(mixture.sample(16)), 0)
    assert math.isfinite(m["loss_dm"]) and math.isfinite(m["loss_gan_critic"])
