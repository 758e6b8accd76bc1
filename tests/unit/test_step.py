"""One DMD2 iteration: TTUR, frozen critic in the generator step, inputs, non-finite handling."""
import pytest
import torch

from dmdscale.config import build_config
from dmdscale.core.loop import train_loop
from dmdscale.core.optim import TorchOptimizedModule
from dmdscale.core.schedule import NoiseSchedule
from dmdscale.core.step import Batch, DMD2Step, NonFiniteLossError, RegressionPairs
from dmdscale.core.networks import Critic
from dmdscale.models.heads import MLPHead
from dmdscale.families.toy2d.model import GaussianMixture2D, MixtureDenoiser, MLPDenoiser


def make_step(overrides=None, teacher_cls=MixtureDenoiser, regression=False, rank=0, world_size=1):
    cfg = build_config({}, {"train.batch_size": 16, "train.warmup_steps": 0, "train.lr": 1e-3,
                            "toy2d.hidden_dim": 16, "toy2d.num_layers": 2, **(overrides or {})})
    torch.manual_seed(0)
    sched = NoiseSchedule.ddpm()
    mixture = GaussianMixture2D()
    teacher = teacher_cls(mixture, sched)
    gen = MLPDenoiser(sched, 2, 16, 2)
    critic = Critic(MLPDenoiser(sched, 2, 16, 2), MLPHead(16, 16))
    pairs = RegressionPairs.build(teacher, torch.randn(32, 2), 5) if regression else None
    step = DMD2Step(cfg, teacher, TorchOptimizedModule(gen, cfg.train, role="generator"),
                    TorchOptimizedModule(critic, cfg.train, role="critic"), regression_pairs=pairs, rank=rank,
                    world_size=world_size)
    return step, gen, critic, mixture


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()


def test_generator_updates_exactly_once_per_ttur_ratio_and_critic_every_iteration():
    step, gen, critic, mixture = make_step({"train.ttur_ratio": 3, "loss.gan_generator_weight": 0.1,
                                            "loss.gan_critic_weight": 0.1})
    gen_changes, critic_changes = [], []
    for i in range(10):
        g0, c0 = flat(gen), flat(critic)
        m = step(Batch(mixture.sample(16)), i)
        gen_changes.append(not torch.equal(g0, flat(gen)))
        critic_changes.append(not torch.equal(c0, flat(critic)))
        assert m["generator_updated"] == float(i % 3 == 0)
    assert gen_changes == [i % 3 == 0 for i in range(10)]
    assert sum(gen_changes) == 4 and all(critic_changes)


def test_generator_step_leaves_no_gradient_on_the_critic():
    step, gen, critic, mixture = make_step({"loss.gan_generator_weight": 1.0})
    seen = []
    orig = step.generator_opt.backward

    def backward(loss):
        orig(loss)
        seen.append([p.grad for p in critic.parameters()])

    step.generator_opt.backward = backward
    m = step(Batch(mixture.sample(16)), 0)
    assert "loss_gan_generator" in m and seen
    assert all(g is None for g in seen[0])
    assert all(p.requires_grad for p in critic.parameters())  # restored afterwards


def test_gan_metrics_and_logits_reported():
    step, _, _, mixture = make_step({"loss.gan_generator_weight": 0.1, "loss.gan_critic_weight": 0.1})
    m = step(Batch(mixture.sample(16)), 0)
    for key in ["loss_dm", "loss_gan_generator", "loss_fake_score", "loss_gan_critic", "logits_real",
                "logits_fake", "grad_norm_generator", "grad_norm_critic"]:
        assert key in m and torch.isfinite(torch.tensor(m[key])), key


def test_multistep_input_uses_backward_simulation_or_noised_real():
    step, _, _, mixture = make_step({"generator.timesteps": [999, 749, 499, 249]})
    batch = Batch(mixture.sample(16))
    from dmdscale.core.sampling import draw_k
    step_k2 = next(s for s in range(100) if draw_k(s, 4, 0) == 2)
    x_in, t = step.generator_input(batch, step_k2)
    assert t.tolist() == [499] * 16
    step_nobs, _, _, _ = make_step({"generator.timesteps": [999, 749, 499, 249],
                                    "generator.backward_simulation": False})
    x_real, t_real = step_nobs.generator_input(batch, step_k2)
    assert t_real.tolist() == [499] * 16
    # Noised real data keeps the data's scale (radius ~2) at t=499; simulation from an
    # untrained generator does not, so the two inputs must differ.
    assert not torch.allclose(x_in, x_real)


def test_simulated_ranks_share_k_but_not_noise():
    four = {"generator.timesteps": [999, 749, 499, 249]}
    (rank0, _, _, mixture), (rank1, _, _, _) = make_step(four, rank=0, world_size=2), make_step(four, rank=1, world_size=2)
    batch = Batch(mixture.sample(16))
    ts = []
    for step in range(12):
        (x0, t0), (x1, t1) = rank0.generator_input(batch, step), rank1.generator_input(batch, step)
        assert torch.equal(t0, t1)  # the same k, hence t_k, on every rank
        assert not torch.allclose(x0, x1)  # each rank's own noise
        ts.append(int(t0[0]))
    assert set(ts) > {999}  # more than one k was drawn


def test_regression_loss_is_applied_when_weighted():
    step, _, _, mixture = make_step({"loss.regression_weight": 1.0}, regression=True)
    m = step(Batch(mixture.sample(16)), 0)
    assert m["loss_regression"] > 0


def test_bf16_autocast_runs():
    step, gen, _, mixture = make_step({"train.mixed_precision": "bf16"})
    g0 = flat(gen)
    m = step(Batch(mixture.sample(16)), 0)
    assert not torch.equal(g0, flat(gen)) and m["nonfinite_generator"] == 0


class NaNTeacher(MixtureDenoiser):
    def predict(self, x_t, t, cond=None):
        return torch.full_like(x_t, float("nan"))


def test_nonfinite_generator_loss_is_reported_and_not_applied():
    step, gen, critic, mixture = make_step(teacher_cls=NaNTeacher)
    g0, c0 = flat(gen), flat(critic)
    m = step(Batch(mixture.sample(16)), 0)
    assert m["nonfinite_generator"] == 1.0
    assert "grad_norm_generator" not in m
    assert torch.equal(g0, flat(gen))
    assert m["nonfinite_critic"] == 0.0 and not torch.equal(c0, flat(critic))


def test_training_loop_stops_after_too_many_nonfinite_iterations():
    step, _, _, mixture = make_step({"train.ttur_ratio": 1}, teacher_cls=NaNTeacher)
    batches = (Batch(mixture.sample(16)) for _ in iter(int, 1))
    with pytest.raises(NonFiniteLossError, match=r"step 3: .*loss_dm.*max_nonfinite_steps=3"):
        train_loop(step, batches, 100, max_nonfinite_steps=3, progress=False)


def test_cfg_guidance_uses_the_unconditional_input():
    class Labelled(MLPDenoiser):
        def predict(self, x_t, t, cond=None):
            return super().predict(x_t, t) + cond[:, None].float()

        def null_cond(self, cond):
            return torch.zeros_like(cond)

    sched = NoiseSchedule.ddpm()
    model = Labelled(sched, 2, 8, 1)
    x, t, c = torch.randn(3, 2), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 3])
    x0_c, x0_u = model(x, t, c), model(x, t, torch.zeros_like(c))
    torch.testing.assert_close(model(x, t, c, guidance_scale=3.0), x0_u + 3.0 * (x0_c - x0_u))
