"""Sample-quality metrics that see colour and variety (dmdscale.eval.diversity).

The constructed tests score sample sets with known defects against real images of coloured
shapes (shape = label, colour free): a colour-collapsed copy that a label-trained classifier's
FID barely notices, and two class-preserving mode drops (colours confined to one hue band per
class; a few images per class repeated). The pure-logic tests pin each metric's defining
property on inputs whose answer is known without running it. Measured figures in comments are
from a 2-core CPU; bench/eval_metrics.py gives their spread over seeds.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dmdscale.data.shapes import colored_shapes
from dmdscale.eval import diversity as dv
from dmdscale.eval.metrics import compute_fid, to_model_input, train_classifier

RESOLUTION = 16
COUNT = 500  # images per set: enough for stable k-NN balls, few enough for seconds per test
HUE_BANDS = (0.0, 0.33, 0.67)  # the mode-dropped set: each class in one colour


def towards_grey(images: np.ndarray, amount: float = 0.7) -> np.ndarray:
    """Blend RGB images `amount` of the way to their luminance: same shapes, washed-out colour."""
    x = images.astype(np.float64)
    luminance = (x @ np.array([0.299, 0.587, 0.114]))[..., None]
    return np.round((1 - amount) * x + amount * luminance).astype(np.uint8)


@pytest.fixture(scope="module")
def shapes() -> dict[str, np.ndarray]:
    """Reference images and sample sets of COUNT images each: held-out real ones, and copies
    with one defect each."""
    real, labels = colored_shapes(COUNT, seed=0)
    held_out, held_out_labels = colored_shapes(COUNT, seed=1)
    few_per_class = np.concatenate([np.flatnonzero(held_out_labels == c)[:3] for c in range(3)])
    return {"real": real, "labels": labels, "held_out": held_out, "grey": towards_grey(held_out),
            "hue_band": colored_shapes(COUNT, seed=2, hue_bands=HUE_BANDS)[0],
            "duplicated": held_out[np.resize(few_per_class, COUNT)]}


@pytest.fixture(scope="module")
def classifier(shapes):
    """dmdscale's FID feature network, trained on the shapes' labels as it is on the digits'."""
    return train_classifier(shapes["real"], shapes["labels"], steps=600, num_classes=3,
                            progress=False)


@pytest.fixture(scope="module")
def scores(shapes, classifier) -> dict[str, dict[str, float]]:
    def features(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return classifier.features(to_model_input(images)).numpy()

    return {name: dv.sample_quality(shapes["real"], shapes[name], features, "classifier")
            for name in ("held_out", "grey", "hue_band", "duplicated")}


# --- constructed sample sets ---------------------------------------------------------------


def test_held_out_real_scores_near_the_floor(scores):
    floor = scores["held_out"]
    for space in ("pixels", "classifier"):
        assert floor[f"precision_{space}"] > 0.8 and floor[f"recall_{space}"] > 0.8
        assert floor[f"coverage_{space}"] > 0.9 and 0.8 < floor[f"density_{space}"] < 1.25
    for name in ("colorfulness", "saturation_bright", "mean_color_spread", "channel_std_0"):
        assert floor[f"{name}_ratio_pixels"] == pytest.approx(1, abs=0.1)
    assert abs(floor["channel_mean_gap_1_pixels"]) < 2  # 0..255 scale


def test_colour_collapse_is_caught_where_classifier_fid_barely_moves(shapes, classifier, scores,
                                                                    tmp_path):
    """Measured: classifier-FID 1.3 held-out, 4.9 grey: x3.7 on a squared distance, x1.9 in
    distance (on another CPU, whose classifier trained to other weights: 1.24 and 6.24, x2.2 in
    distance), and of the order of the floor's own variation between seeds (bench, 1000 images,
    two seeds: floor 1.6 and 2.7, grey 2.3 and 2.9). Recall in classifier space 0.94 -> 0.94.
    Meanwhile colourfulness fell to 0.30 of the data's, bright saturation to 0.43, recall in
    pixels 0.88 -> 0.37, and SWD rose 34 -> 100."""
    fid_floor = compute_fid(shapes["held_out"], shapes["real"], classifier)
    fid_grey = compute_fid(shapes["grey"], shapes["real"], classifier)
    # In distance units (FID is a squared distance): a classifier that saw colour would put
    # grey shapes many times the floor away.
    assert fid_grey ** 0.5 < 2.5 * fid_floor ** 0.5
    floor, grey = scores["held_out"], scores["grey"]
    assert grey["recall_classifier"] > floor["recall_classifier"] - 0.1
    assert grey["colorfulness_ratio_pixels"] < 0.5 and grey["saturation_bright_ratio_pixels"] < 0.6
    assert grey["recall_pixels"] < floor["recall_pixels"] - 0.3
    assert grey["swd_pixels"] > 2 * floor["swd_pixels"]


def test_class_preserving_mode_drops_are_caught(scores):
    """Hue band: every class in every position and size, but each in one colour. Measured: SWD
    34 -> 97, recall in pixels 0.88 -> 0.56 (in classifier space 0.94 -> 0.89). Duplicated:
    three images per class repeated. Measured: SWD 34 -> 222, recall 0 in both spaces,
    coverage 0.96 -> 0.08 in pixels and 0.97 -> 0.10 in classifier space."""
    floor, banded, duplicated = scores["held_out"], scores["hue_band"], scores["duplicated"]
    assert banded["swd_pixels"] > 2 * floor["swd_pixels"]
    assert banded["recall_pixels"] < floor["recall_pixels"] - 0.2
    assert duplicated["swd_pixels"] > 2 * floor["swd_pixels"]
    for space in ("pixels", "classifier"):
        assert duplicated[f"recall_{space}"] < 0.1 and duplicated[f"coverage_{space}"] < 0.2


# --- pure logic ------------------------------------------------------------------------------


def test_identical_feature_sets_score_one():
    features = np.random.default_rng(0).normal(size=(300, 16))
    assert dv.precision_recall(features, features) == {"precision": 1.0, "recall": 1.0}
    assert dv.density_coverage(features, features)["coverage"] == 1.0


def test_far_apart_clusters_score_zero():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(300, 16)), rng.normal(100, 1, size=(300, 16))
    assert dv.precision_recall(real, fake) == {"precision": 0.0, "recall": 0.0}
    assert dv.density_coverage(real, fake) == {"density": 0.0, "coverage": 0.0}


def test_repeating_a_few_real_points_keeps_precision_and_loses_recall():
    """Mode collapse in feature space: every sample is real (fidelity intact), five of them."""
    real = np.random.default_rng(0).normal(size=(400, 16))
    collapsed = real[np.arange(400) % 5]
    assert dv.precision_recall(real, collapsed)["precision"] == 1.0
    assert dv.precision_recall(real, collapsed)["recall"] < 0.05
    # Each of the five lies in its own ball and in about k = 5 others: ~30 of 400 covered.
    assert dv.density_coverage(real, collapsed)["coverage"] < 0.12


def test_swd_is_zero_for_identical_sets_and_grows_with_a_shift():
    images, _ = colored_shapes(150, seed=3)
    assert dv.sliced_wasserstein(images, images)["swd"] == 0.0
    brighter = [np.clip(images.astype(int) + shift, 0, 255).astype(np.uint8) for shift in (10, 40)]
    shifted = [dv.sliced_wasserstein(images, fake) for fake in brighter]
    assert 0 < shifted[0]["swd"] < shifted[1]["swd"]
    # A brightness shift lives in the low frequencies: the coarsest level sees most of it.
    assert shifted[1]["swd8"] > shifted[1]["swd16"]


def test_pyramid_keeps_the_coarsest_level_at_least_8_px():
    assert dv.pyramid_resolutions(8) == [8] and dv.pyramid_resolutions(16) == [16, 8]
    assert dv.pyramid_resolutions(64) == [64, 32, 16, 8] and dv.pyramid_resolutions(28) == [28, 14]
    with pytest.raises(ValueError):
        dv.pyramid_resolutions(6)
    images, _ = colored_shapes(50, seed=4)
    big = images.repeat(2, axis=1).repeat(2, axis=2)  # 32 px
    assert set(dv.sliced_wasserstein(big, big)) == {"swd32", "swd16", "swd8", "swd"}


def test_colorfulness_and_saturation_of_grey_images_are_zero():
    images, _ = colored_shapes(100, seed=5)
    for grey in (towards_grey(images, 1.0), towards_grey(images, 1.0)[..., :1]):  # RGB, 1 channel
        stats = dv.image_statistics(grey)
        assert stats["colorfulness"] == 0.0 and stats["saturation_bright"] == 0.0
    colourful = dv.image_statistics(images)
    halfway = dv.image_statistics(towards_grey(images, 0.5))
    assert colourful["colorfulness"] > halfway["colorfulness"] > 0
    assert colourful["saturation_bright"] > halfway["saturation_bright"] > 0


def test_statistics_gap_reads_a_colour_cast_and_a_loss_of_contrast():
    images, _ = colored_shapes(100, seed=6)
    cast = images.copy()
    cast[..., 0] = np.clip(cast[..., 0].astype(int) + 20, 0, 255)
    assert dv.statistics_gap(images, cast)["channel_mean_gap_0"] > 15
    flat = np.round(images * 0.5).astype(np.uint8)
    assert dv.statistics_gap(images, flat)["channel_std_1_ratio"] == pytest.approx(0.5, abs=0.01)


def test_a_grey_rgb_reference_leaves_its_colour_ratios_out():
    """Grey digits stored as RGB have no colour to compare to: no colourfulness or saturation
    ratio (an undefined ratio would be NaN, which metrics.json cannot hold as JSON)."""
    grey = towards_grey(colored_shapes(60, seed=8)[0], 1.0)
    quality = dv.sample_quality(grey, colored_shapes(60, seed=9)[0], seed=0)
    assert "colorfulness_ratio_pixels" not in quality and "saturation_bright_ratio_pixels" not in quality
    assert "channel_std_0_ratio_pixels" in quality and all(np.isfinite(v) for v in quality.values())


def test_pixel_features_average_large_images_down():
    images, _ = colored_shapes(10, seed=7)
    big = images.repeat(4, axis=1).repeat(4, axis=2)  # 64 px, each pixel a 4x4 block
    np.testing.assert_allclose(dv.pixel_features(big), dv.pixel_features(images))
    assert dv.pixel_features(images).shape == (10, 3 * RESOLUTION**2)


def test_sample_quality_is_deterministic_given_a_seed(shapes):
    real, fake = shapes["real"][:150], shapes["held_out"][:150]
    first, again = dv.sample_quality(real, fake, seed=0), dv.sample_quality(real, fake, seed=0)
    assert first == again
    other = dv.sample_quality(real, fake, seed=1)
    assert other["swd_pixels"] != first["swd_pixels"]
    assert other["swd_pixels"] == pytest.approx(first["swd_pixels"], rel=0.25)


def test_every_key_names_its_feature_space(shapes):
    real, fake = shapes["real"][:100], shapes["held_out"][:100]
    metrics = dv.sample_quality(real, fake, lambda x: x.reshape(len(x), -1)[:, ::7] / 255, "raw")
    spaces = {key.rsplit("_", 1)[1] for key in metrics}
    assert spaces == {"pixels", "raw"}
    assert {"recall_raw", "recall_pixels", "swd_pixels", "colorfulness_pixels"} <= set(metrics)
    assert all(isinstance(value, float) for value in metrics.values())
    for bad_name in ("pixels", "my_space", "Classifier"):
        with pytest.raises(ValueError):
            dv.sample_quality(real, fake, dv.pixel_features, bad_name)
    with pytest.raises(ValueError):
        dv.sample_quality(real, fake, dv.pixel_features)
