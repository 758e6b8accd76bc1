"""Each DMD2 loss against an independent computation."""
import math

import numpy as np
import torch

from dmdscale.core.losses import dm_loss, gan_critic_loss, gan_generator_loss, pseudo_huber, regression_loss


def _expected_dm_grad(x, x0_real, x0_fake):
    """grad / numel, computed per sample in numpy."""
    x, r, f = (a.detach().double().numpy() for a in (x, x0_real, x0_fake))
    out = np.empty_like(x)
    for i in range(len(x)):
        p_real, p_fake = x[i] - r[i], x[i] - f[i]
        out[i] = (p_real - p_fake) / np.abs(p_real).mean()
    return out / x.size


def test_dm_loss_gradient_is_normalised_grad_over_numel():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    x0_real, x0_fake = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    dm_loss(x, x0_real, x0_fake).backward()
    np.testing.assert_allclose(x.grad.double().numpy(), _expected_dm_grad(x, x0_real, x0_fake), rtol=1e-5, atol=1e-9)


def test_dm_loss_normalises_each_sample_by_its_own_real_residual():
    torch.manual_seed(1)
    x = torch.randn(2, 8, requires_grad=True)
    x0_real, x0_fake = torch.randn(2, 8), torch.randn(2, 8)
    dm_loss(x, x0_real, x0_fake).backward()
    g1 = x.grad.clone()
    # Move sample 0's teacher prediction and its fake score by the same offset: the
    # numerator is unchanged, so only sample 0's normaliser (and gradient) changes.
    x.grad = None
    x0_real2, x0_fake2 = x0_real.clone(), x0_fake.clone()
    x0_real2[0] += 3.0
    x0_fake2[0] += 3.0
    dm_loss(x, x0_real2, x0_fake2).backward()
    torch.testing.assert_close(x.grad[1], g1[1])
    assert not torch.allclose(x.grad[0], g1[0])
    ratio = (g1[0] / x.grad[0]).mean().detach()
    expected = (x[0].detach() - x0_real2[0]).abs().mean() / (x[0].detach() - x0_real[0]).abs().mean()
    assert math.isclose(float(ratio), float(expected), rel_tol=1e-4)


def test_dm_loss_moves_x_toward_teacher_and_is_zero_when_scores_agree():
    x = torch.zeros(1, 2, requires_grad=True)
    dm_loss(x, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])).backward()
    assert x.grad[0, 0] < 0 and x.grad[0, 1] == 0  # descending increases x toward x0_real
    x.grad = None
    same = torch.randn(1, 2)
    dm_loss(x, same, same).backward()
    assert torch.count_nonzero(x.grad) == 0


def test_dm_loss_turns_nan_gradient_into_zero():
    """x already equals both predictions: 0/0 in the normalised gradient becomes 0, as in the
    reference's nan_to_num. (An infinite loss is left to the step's non-finite guard.)"""
    x = torch.ones(2, 3, requires_grad=True)
    loss = dm_loss(x, torch.ones(2, 3), torch.ones(2, 3))
    loss.backward()
    assert float(loss.detach()) == 0 and torch.count_nonzero(x.grad) == 0


def test_gan_losses_match_log_sigmoid_formulas():
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.0, 1.5])
    sig = torch.sigmoid
    expected_d = -torch.log(1 - sig(fake)).mean() - torch.log(sig(real)).mean()
    expected_g = -torch.log(sig(fake)).mean()
    torch.testing.assert_close(gan_critic_loss(real, fake), expected_d)
    torch.testing.assert_close(gan_generator_loss(fake), expected_g)


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far():
    x = torch.zeros(2, 100)
    c = 0.00054 * math.sqrt(100)
    far = torch.full((2, 100), 1.0)
    assert math.isclose(float(pseudo_huber(far, x)), math.sqrt(100 + c * c) - c, rel_tol=1e-6)
    tiny = torch.full((2, 100), 1e-5)
    assert math.isclose(float(pseudo_huber(tiny, x)), 100 * 1e-10 / (2 * c), rel_tol=1e-2)
    torch.testing.assert_close(regression_loss(far, x, "mse"), torch.tensor(1.0))
