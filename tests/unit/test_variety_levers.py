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
