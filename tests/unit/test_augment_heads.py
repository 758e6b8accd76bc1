"""DiffAugment transforms and the full-width discriminator head."""
import pytest
import torch

from dmdscale.core.augment import AUGMENTATIONS, augment
from dmdscale.models.heads import HEADS, ConvHead, FullHead


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("policy", [("flip",), ("shift",), ("cutout",), AUGMENTATIONS])
def test_augment_keeps_shape_dtype_and_passes_gradients(policy):
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(6, 3, 16, 16, dtype=dtype, requires_grad=True)
        out = augment(x, policy, _seeded(0))
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
        out.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_empty_policy_returns_input():
    x = torch.randn(2, 1, 8, 8)
    assert augment(x, ()) is x


def test_same_seed_same_output_different_seed_differs():
    x = torch.randn(16, 1, 16, 16)
    first = augment(x, AUGMENTATIONS, _seeded(1))
    assert torch.equal(first, augment(x, AUGMENTATIONS, _seeded(1)))
    assert not torch.equal(first, augment(x, AUGMENTATIONS, _seeded(2)))


@pytest.mark.parametrize("size", [8, 16, 17])
def test_cutout_zeros_a_half_size_square_per_sample(size):
    side = round(size / 2)
    out = augment(torch.ones(32, 2, size, size), ["cutout"], _seeded(0))
    zeros = out == 0
    assert (zeros.sum(dim=(1, 2, 3)) == 2 * side * side).all()
    for mask in zeros[:, 0]:  # the zeros form one side x side square
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        assert len(rows) == len(cols) == side
        assert rows.max() - rows.min() == cols.max() - cols.min() == side - 1


def test_cutout_positions_vary_across_samples():
    out = augment(torch.ones(32, 1, 16, 16), ["cutout"], _seeded(0))
    assert len({tuple(m.flatten().tolist()) for m in out[:, 0] == 0}) > 1


def test_shift_moves_centred_content_without_losing_it():
    x = torch.zeros(32, 1, 16, 16)
    x[:, :, 4:12, 4:12] = torch.rand(32, 1, 8, 8) + 0.1  # margin 4 > max shift 2
    out = augment(x, ["shift"], _seeded(0))
    torch.testing.assert_close(out.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))
    moved = [not torch.equal(o, i) for o, i in zip(out, x)]
    assert any(moved)
    for o, i in zip(out, x):  # each output is the input translated by some (dy, dx) in [-2, 2]
        assert any(
            torch.equal(o, torch.roll(i, (dy, dx), dims=(-2, -1)))
            for dy in range(-2, 3)
            for dx in range(-2, 3)
        )


def test_shift_zero_fills_the_uncovered_border():
    out = augment(torch.ones(64, 1, 16, 16), ["shift"], _seeded(0))
    assert (out == 0).any() and ((out == 0) | (out == 1)).all()


def test_flip_gives_the_image_or_its_mirror():
    image = torch.arange(12.0).reshape(1, 3, 4)  # asymmetric
    x = image.expand(32, 1, 3, 4)
    out = augment(x, ["flip"], _seeded(0))
    mirrored = [torch.equal(o, image.flip(-1)) for o in out]
    assert all(m or torch.equal(o, image) for m, o in zip(mirrored, out))
    assert 0 < sum(mirrored) < len(out)


def test_unknown_augmentation_names_the_allowed_ones():
    with pytest.raises(ValueError, match="flip.*shift.*cutout"):
        augment(torch.zeros(1, 1, 8, 8), ["shift", "rotate"])


def test_policy_as_bare_string_is_rejected():
    with pytest.raises(TypeError):
        augment(torch.zeros(1, 1, 8, 8), "shift")


@pytest.mark.parametrize("shape", [(3, 64, 2, 2), (3, 64, 4, 4), (3, 32, 8, 8), (3, 16, 1, 1), (3, 16, 3, 5)])
def test_full_head_gives_a_logit_map_for_small_bottlenecks(shape):
    features = torch.randn(shape, requires_grad=True)
    logits = FullHead(shape[1])(features)
    batch, _, h, w = logits.shape
    assert batch == shape[0] and logits.shape[1] == 1 and h >= 1 and w >= 1
    logits.mean().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_full_head_downsamples_by_four_on_large_maps():
    assert FullHead(32)(torch.randn(2, 32, 8, 8)).shape == (2, 1, 2, 2)
    assert FullHead(32)(torch.randn(2, 32, 16, 12)).shape == (2, 1, 4, 3)


def test_full_head_is_larger_than_conv_head():
    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(FullHead(64)) > count(ConvHead(64))


def test_heads_registry_and_for_model():
    class Bottleneck:
        feature_channels = 64

    assert HEADS == {"conv": ConvHead, "full": FullHead}
    for head_class in HEADS.values():
        head = head_class.for_model(Bottleneck())
        assert head(torch.randn(2, 64, 4, 4)).shape[:2] == (2, 1)


def test_full_head_learns_to_separate_two_feature_clouds_on_a_4x4_map():
    """On the digits UNet's 4x4 bottleneck the last conv's map is 1x1; GroupNorm with too few
    channels per group there left the head at P = 0.5 whatever it saw."""
    torch.manual_seed(0)
    head = FullHead(64)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(60):
        a, b = torch.randn(32, 64, 4, 4), torch.randn(32, 64, 4, 4) + 0.3
        logits = head(torch.cat([a, b])).flatten(1).mean(1)
        loss = torch.nn.functional.softplus(logits[:32]).mean() + torch.nn.functional.softplus(-logits[32:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        a, b = torch.randn(64, 64, 4, 4), torch.randn(64, 64, 4, 4) + 0.3
        accuracy = ((head(a).flatten(1).mean(1) < 0).float().mean() + (head(b).flatten(1).mean(1) > 0).float().mean()) / 2
    assert accuracy > 0.9
