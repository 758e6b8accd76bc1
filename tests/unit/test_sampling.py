"""Few-step sampling and backward simulation."""
import pytest
import torch

from dmdscale.core.sampling import backward_simulate, draw_k, sample
from dmdscale.core.schedule import NoiseSchedule

FOUR_STEP = [999, 749, 499, 249]


class RecordingGenerator:
    """G(x, t) = x / 2, recording every (x, t) it is called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        self.calls.append((x.clone(), t.clone()))
        return x / 2


def test_sampling_visits_the_four_step_schedule_in_order_and_renoises():
    sched = NoiseSchedule.ddpm()
    g = RecordingGenerator()
    noise = torch.randn(3, 2)
    out = sample(g, sched, noise, FOUR_STEP, rng=torch.Generator().manual_seed(0))
    assert [int(t[0]) for _, t in g.calls] == FOUR_STEP
    torch.testing.assert_close(g.calls[0][0], noise)
    # Each later input is add_noise(previous x0, fresh noise, next t); check with that noise.
    rng = torch.Generator().manual_seed(0)
    x = noise
    for i, t in enumerate(FOUR_STEP[1:]):
        x = sched.add_noise(x / 2, torch.randn(3, 2, generator=rng), torch.full((3,), t))
        torch.testing.assert_close(g.calls[i + 1][0], x)
    torch.testing.assert_close(out, g.calls[-1][0] / 2)


def test_k_is_uniform_over_steps_and_identical_across_ranks():
    ks = [draw_k(step, 4, seed=7) for step in range(4000)]
    assert set(ks) == {0, 1, 2, 3}
    for k in range(4):
        assert 0.2 < ks.count(k) / len(ks) < 0.3
    # Another "rank" (any process, same shared seed) draws the same sequence...
    assert ks == [draw_k(step, 4, seed=7) for step in range(4000)]
    # ...and a different seed a different one.
    assert ks != [draw_k(step, 4, seed=8) for step in range(4000)]


def test_k_zero_is_pure_noise_at_the_first_timestep():
    g = RecordingGenerator()
    x, t = backward_simulate(g, NoiseSchedule.ddpm(), FOUR_STEP, 0, (5, 2), rng=torch.Generator().manual_seed(3))
    assert g.calls == [] and t.tolist() == [999] * 5
    torch.testing.assert_close(x, torch.randn(5, 2, generator=torch.Generator().manual_seed(3)))


def test_backward_simulation_runs_k_steps_then_renoises_to_t_k():
    g = RecordingGenerator()
    x, t = backward_simulate(g, NoiseSchedule.ddpm(), FOUR_STEP, 2, (4, 2), rng=torch.Generator().manual_seed(0))
    assert [int(tt[0]) for _, tt in g.calls] == [999, 749]
    assert t.tolist() == [499] * 4


def test_training_noise_is_independent_of_simulation_noise():
    """With G = x/2 and k = 1: x_in = a * (z0 / 2) + s * z1; z1 must not be z0 (or correlated)."""
    sched = NoiseSchedule.ddpm()
    n = 20000
    x, t = backward_simulate(RecordingGenerator(), sched, FOUR_STEP, 1, (n, 1), rng=torch.Generator().manual_seed(0))
    z0 = torch.randn(n, 1, generator=torch.Generator().manual_seed(0))
    abar = sched.alphas_cumprod[749].float()
    z1 = (x - abar.sqrt() * z0 / 2) / (1 - abar).sqrt()
    assert abs(float(z1.std()) - 1) < 0.03  # z1 is a real unit-variance noise draw
    corr = float(torch.corrcoef(torch.cat([z0, z1], 1).T)[0, 1])
    assert abs(corr) < 0.03, corr


def test_noise_stream_gives_each_sample_the_same_noise_however_the_batch_is_split():
    from dmdscale.core.sampling import NoiseStream

    def draw(rank, world):
        s = NoiseStream(torch.Generator().manual_seed(3), rank, world)
        return s.randn((4, 2), "cpu", torch.float32), s.randint(0, 1000, 4, "cpu")

    whole = NoiseStream(torch.Generator().manual_seed(3))
    full_x, full_t = whole.randn((8, 2), "cpu", torch.float32), whole.randint(0, 1000, 8, "cpu")
    (x0, t0), (x1, t1) = draw(0, 2), draw(1, 2)
    assert torch.equal(torch.cat([x0, x1]), full_x) and torch.equal(torch.cat([t0, t1]), full_t)
    with pytest.raises(ValueError, match="rank 2"):
        NoiseStream(torch.Generator(), 2, 2)
