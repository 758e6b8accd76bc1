"""Evaluation on real digits with real clean-fid: classifier, cache, FID, extractor, grids."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid.resize import build_resizer
from PIL import Image
from safetensors import safe_open
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from dmdscale.eval import metrics as ev
from dmdscale.eval.plots import plot_curves, save_grid

CPU = torch.device("cpu")


def _digits_16() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits (values 0..16) as uint8 NHWC at 16x16, PIL bilinear."""
    d = load_digits()
    small = np.round(d.images * 255 / 16).astype(np.uint8)
    big = [np.asarray(Image.fromarray(im).resize((16, 16), Image.BILINEAR)) for im in small]
    return np.stack(big)[..., None], d.target.astype(np.int64)


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    """Stratified splits: train (classifier), A and B (two disjoint held-out real sets of 360)."""
    x, y = _digits_16()
    xtr, xho, ytr, yho = train_test_split(x, y, test_size=720, stratify=y, random_state=0)
    xa, xb, ya, yb = train_test_split(xho, yho, test_size=0.5, stratify=yho, random_state=0)
    return {"xtr": xtr, "ytr": ytr, "xa": xa, "ya": ya, "xb": xb, "yb": yb}


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory) -> dict:
    """Train once through the cache (first call trains) and record how long that took."""
    cache = tmp_path_factory.mktemp("clf_cache")
    t0 = time.perf_counter()
    clf = ev.load_or_train_classifier(cache, digits["xtr"], digits["ytr"], progress=False)
    return {"clf": clf, "cache": cache, "train_s": time.perf_counter() - t0}


@pytest.fixture(scope="module")
def clf(trained) -> ev.DigitClassifier:
    return trained["clf"]


def test_to_model_input_range_and_layout():
    x = np.array([[[[0], [255]], [[128], [0]]]], dtype=np.uint8)  # (1, 2, 2, 1)
    t = ev.to_model_input(x)
    assert t.shape == (1, 1, 2, 2) and t.dtype == torch.float32
    assert t.min() == -1.0 and t.max() == 1.0 and t[0, 0, 0, 1] == 1.0
    with pytest.raises(ValueError):
        ev.to_model_input(x.astype(np.float32))


def test_classifier_heldout_accuracy(clf, digits):
    acc = ev.class_accuracy(clf, digits["xa"], digits["ya"])
    print(f"held-out accuracy A={acc:.4f}")
    assert acc >= 0.95
    assert clf.features(ev.to_model_input(digits["xa"][:4])).shape == (4, clf.feature_dim)


def test_class_accuracy_of_noise_is_chance(clf, digits):
    noise = np.random.default_rng(0).integers(0, 256, digits["xa"].shape, dtype=np.uint8)
    acc = ev.class_accuracy(clf, noise, digits["ya"])
    print(f"noise accuracy={acc:.4f}")
    assert acc < 0.25


def test_cache_loads_instead_of_training(trained, digits):
    files = list(trained["cache"].glob("*"))
    assert len(files) == 1 and files[0].suffix == ".safetensors"
    with safe_open(str(files[0]), framework="pt") as f:  # a safetensors file, not a pickle
        assert "config" in f.metadata()
    mtime = files[0].stat().st_mtime_ns

    t0 = time.perf_counter()
    again = ev.load_or_train_classifier(trained["cache"], digits["xtr"], digits["ytr"],
                                        progress=False)
    load_s = time.perf_counter() - t0
    assert files[0].stat().st_mtime_ns == mtime
    assert load_s < trained["train_s"] / 5
    for (k, a), (_, b) in zip(trained["clf"].state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k

    # Different hyperparameters or data are a different key: a second file appears.
    ev.load_or_train_classifier(trained["cache"], digits["xtr"], digits["ytr"], steps=2,
                                progress=False)
    ev.load_or_train_classifier(trained["cache"], digits["xtr"][:-1], digits["ytr"][:-1],
                                steps=2, progress=False)
    assert len(list(trained["cache"].glob("*.safetensors"))) == 3
    assert not list(trained["cache"].glob("*.tmp"))


def test_extractor_matches_classifier_through_cleanfid_pipeline(clf, digits, tmp_path):
    """Features from clean-fid's real loading + 299x299 'clean' resize, through the wrapper,
    agree with the classifier's features on the original 16x16 images."""
    folder = ev.write_png_folder(digits["xa"], tmp_path / "a")
    feats = cleanfid_fid.get_folder_features(
        str(folder), model=ev.CleanFIDFeatures(clf), num_workers=0, batch_size=100,
        device=CPU, mode="clean", verbose=False)
    with torch.no_grad():
        direct = clf.features(ev.to_model_input(digits["xa"]))
        via = torch.from_numpy(feats)
        cos = torch.nn.functional.cosine_similarity(via, direct, dim=1)
        agree = (clf.head(via).argmax(1) == clf.head(direct).argmax(1)).float().mean().item()
    print(f"extractor cosine mean={cos.mean():.5f} min={cos.min():.5f} agreement={agree:.4f}")
    assert feats.shape == (len(digits["xa"]), clf.feature_dim)
    assert cos.min() > 0.99 and agree >= 0.98


def test_fid_real_vs_real_vs_corrupted(clf, digits):
    xa = digits["xa"]
    noisy = np.clip(xa + np.random.default_rng(0).normal(0, 80, xa.shape), 0, 255).astype(np.uint8)

    same = ev.compute_fid(xa, xa, clf)
    real = ev.compute_fid(xa, digits["xb"], clf)
    noise = ev.compute_fid(xa, noisy, clf)
    print(f"FID same={same:.4f} A-vs-B={real:.2f} noisy={noise:.2f}")
    assert abs(same) < 1e-3
    assert real < 0.2 * noise


def test_fid_accepts_wrapped_extractor(clf, digits):
    a, b = digits["xa"][:60], digits["xb"][:60]
    wrapped = ev.compute_fid(a, b, ev.CleanFIDFeatures(clf))
    assert wrapped == pytest.approx(ev.compute_fid(a, b, clf))
    with pytest.raises(ValueError):
        ev.compute_fid(a[:1], b, clf)


class _PooledPixels(torch.nn.Module):
    """A fixed extractor with features in [0, 1] (8x8 mean grey levels), the scale clean-fid's
    cubic KID kernel (x.y / d + 1)^3 is meant for (Inception's pooled activations): the digit
    classifier's unnormalised features make that kernel's values ~1e4 and KID very noisy at 40."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), 8).flatten(1) / 255


def test_kid_near_zero_on_itself_and_positive_on_shifted_set(digits):
    a, b = digits["xa"][:40], digits["xb"][:40]
    extractor = _PooledPixels()
    _, same = ev.compute_fid_kid(a, a, extractor)
    _, real = ev.compute_fid_kid(a, b, extractor)
    _, shifted = ev.compute_fid_kid(a, np.roll(a, 3, axis=2), extractor)
    print(f"KID same={same:.5f} A-vs-B={real:.5f} shifted={shifted:.5f}")
    # A set against itself is not two independent samples: the unbiased estimate is then
    # slightly negative (-2/m times the mean kernel's diagonal excess), not exactly 0.
    assert abs(same) < 0.05 * shifted and abs(real) < 0.05 * shifted
    assert shifted > 0.1


def test_clean_resize_is_cleanfids_resizer():
    """The in-memory resize is clean-fid's "clean" resizer on the RGB image its folder loader
    makes of each PNG, to float rounding, for grayscale and RGB, square and not."""
    rng = np.random.default_rng(0)
    resizer = build_resizer("clean")
    for shape in [(3, 16, 16, 1), (2, 12, 20, 3)]:
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        ours = ev.clean_resize(images).numpy()
        assert ours.shape == (shape[0], 3, 299, 299) and ours.dtype == np.float32
        for image, resized in zip(images, ours):
            rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
            reference = resizer(rgb)  # (299, 299, 3) float32 in [0, 255]
            # noise overshoots under bicubic, so the clipping is exercised too
            assert (reference == 0).any() and (reference == 255).any()
            np.testing.assert_allclose(resized.transpose(1, 2, 0), reference, atol=2e-3)


@pytest.mark.filterwarnings("ignore:.*`disp` argument:DeprecationWarning")  # clean-fid's sqrtm call
def test_fid_of_compute_fid_kid_is_compute_fid_and_cleanfid(clf, digits, tmp_path):
    """Extracting features once and in memory changes no FID: compute_fid_kid's FID is
    compute_fid's, and both are clean-fid's own `compute_fid` on PNG folders of the same images
    (what compute_fid called before) to float rounding."""
    a, b = digits["xa"][:40], digits["xb"][:50]
    fid, _ = ev.compute_fid_kid(a, b, clf)
    reference = cleanfid_fid.compute_fid(
        str(ev.write_png_folder(a, tmp_path / "a")), str(ev.write_png_folder(b, tmp_path / "b")),
        mode="clean", custom_feat_extractor=ev.CleanFIDFeatures(clf), device=CPU, num_workers=0,
        batch_size=100, verbose=False, use_dataparallel=False)
    assert fid == ev.compute_fid(a, b, clf)
    assert fid == pytest.approx(reference, rel=1e-4)
    with pytest.raises(ValueError, match="at least two"):
        ev.compute_fid_kid(a[:1], b, clf)


def test_kid_is_deterministic_and_leaves_numpy_rng_alone(digits, monkeypatch):
    """Sets of different sizes, so clean-fid's random subsets of the larger one matter."""
    a, b = digits["xa"][:40], digits["xb"][:60]
    np.random.seed(1)
    _, first = ev.compute_fid_kid(a, b, _PooledPixels())
    np.random.seed(2)  # the caller's global RNG state does not matter...
    state = np.random.get_state()
    _, second = ev.compute_fid_kid(a, b, _PooledPixels())
    after = np.random.get_state()
    assert first == second
    # ... and is left as it was
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2:] == after[2:]
    monkeypatch.setattr(ev, "KID_SEED", 1)  # while the subsets' seed does: the draw is pinned
    assert ev.compute_fid_kid(a, b, _PooledPixels())[1] != first


def test_inception_without_weights_raises_clear_error(digits):
    path = ev.inception_weights_path()
    if path.exists():
        pytest.skip(f"Inception weights present at {path}")
    with pytest.raises(FileNotFoundError, match="DigitClassifier") as err:
        ev.compute_fid(digits["xa"][:4], digits["xb"][:4], "inception")
    assert str(path) in str(err.value)
    assert not path.exists()  # nothing was downloaded
    with pytest.raises(ValueError):
        ev.compute_fid(digits["xa"][:4], digits["xb"][:4], "vgg")


def test_save_grid_grows_with_images(digits, tmp_path):
    small = save_grid(digits["xa"][:10], digits["ya"][:10], tmp_path / "small.png", title="ten")
    big = save_grid(digits["xa"][:40], digits["ya"][:40], tmp_path / "big.png")
    unlabelled = save_grid(digits["xa"][:3], None, tmp_path / "sub" / "three.png")
    with Image.open(small) as s, Image.open(big) as b, Image.open(unlabelled) as u:
        assert s.format == b.format == u.format == "PNG"
        assert b.size[1] > s.size[1] and b.size[0] == s.size[0] and u.size[0] < s.size[0]
        assert s.size[0] >= 10 * 16 * 3  # digits shown enlarged


def test_plot_curves_draws_one_panel_per_curve(tmp_path):
    one = plot_curves({"loss_dm": ([0, 10, 20], [1.0, 0.5, 0.2])}, tmp_path / "one.png")
    three = plot_curves({"loss_dm": ([0, 1], [1.0, 2.0]), "loss_fake_score": ([0, 1], [0.3, 0.2]),
                         "fid": ([100, 200], [40.0, 20.0])}, tmp_path / "three.png")
    with Image.open(one) as a, Image.open(three) as b:
        assert a.format == b.format == "PNG"
        assert b.size[0] > 2 * a.size[0] and b.size[1] == a.size[1]
