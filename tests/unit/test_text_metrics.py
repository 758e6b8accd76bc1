"""Text-to-image metrics (dmdscale.eval.text): CLIP score, reference statistics cache, patch
crops, clear errors for missing weights; on a tiny random-weight CLIPModel built offline."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dmdscale.config import ConfigError, build_config
from dmdscale.eval.metrics import image_features
from dmdscale.eval.text import (
    clip_image_embeddings,
    clip_score,
    clip_text_embeddings,
    feature_stats,
    fid_features,
    fid_kid,
    frechet_distance,
    load_clip,
    load_inception,
    read_stats,
    real_image_chunks,
    reference_stats,
    regular_crops,
)
from dmdscale.tools.tiny_sd import build_tiny_clip

PROMPTS = ["a red square", "a blue circle", "two cats", "a handwritten digit 7", "noise", "a dog on grass"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3)).astype(np.uint8)


def test_clip_score_is_100_times_the_clamped_cosine(clip_folder):
    """Equal to the hand computation on the embeddings, deterministic, in [0, 100]; flipping the
    text projection flips every cosine, so the two scores add up to 100 * mean |cos| (the clamp)."""
    clip, imgs = load_clip(clip_folder), images(len(PROMPTS))
    cos = F.cosine_similarity(clip_image_embeddings(imgs, clip), clip_text_embeddings(PROMPTS, clip))
    score = clip_score(imgs, PROMPTS, clip)
    assert score == pytest.approx(float(100 * cos.clamp(min=0).mean()), abs=1e-5)
    assert score == clip_score(imgs, PROMPTS, clip)
    with torch.no_grad():
        clip.model.text_projection.weight.neg_()
    flipped = clip_score(imgs, PROMPTS, clip)
    assert 0 < score <= 100 and 0 <= flipped <= 100
    assert score + flipped == pytest.approx(float(100 * cos.abs().mean()), abs=1e-4)
    with pytest.raises(ValueError, match="6 images, 5 prompts"):
        clip_score(imgs, PROMPTS[:5], clip)


def test_clip_fid_features_measure_a_set_against_itself_as_zero(clip_folder):
    extractor = fid_features("clip", clip=load_clip(clip_folder))
    a, b = image_features(images(40, 1), extractor), image_features(images(40, 2) // 4, extractor)
    assert a.shape == (40, 32)
    fid_same, _ = fid_kid(a, a, "clip")
    fid_other, kid_other = fid_kid(b, a, "clip")
    assert abs(fid_same) < 1e-3 < fid_other and np.isfinite(kid_other)
    assert frechet_distance(feature_stats(b), feature_stats(a)) == pytest.approx(fid_other, rel=1e-6)


def test_reference_stats_are_computed_once_and_reused(tmp_path):
    calls = []

    def features() -> np.ndarray:
        calls.append(1)
        return np.random.RandomState(0).randn(50, 8)

    key = {"source": "/data/coco", "resolution": 256, "extractor": "inception", "patch_size": None}
    first, path, cached = reference_stats(key, tmp_path, features)
    mtime = path.stat().st_mtime_ns
    again, path2, cached2 = reference_stats(key, tmp_path, features)
    assert (cached, cached2, len(calls), path2) == (False, True, 1, path)
    assert path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again["sigma"], first["sigma"])
    assert int(again["count"]) == 50
    _, other, _ = reference_stats({**key, "resolution": 512}, tmp_path, features)  # another key: another file
    assert other != path and len(calls) == 2
    with pytest.raises(ValueError, match="extractor 'inception'"):
        read_stats(path, {"extractor": "clip:/models/clip", "patch_size": None})


def test_regular_crops_tile_edge_to_edge():
    imgs = images(3, size=32)
    tiles = regular_crops(imgs, 16)
    assert tiles.shape == (12, 16, 16, 3)
    np.testing.assert_array_equal(tiles[3 * 3 + 0], imgs[0, 16:, 16:])  # the 4th tile position, image 0
    overlapping = regular_crops(imgs, 20)  # ceil(32 / 20) = 2 per axis, at 0 and 12
    np.testing.assert_array_equal(overlapping[3], imgs[0, :20, 12:])  # position (0, 12), image 0
    with pytest.raises(ValueError, match="16x16"):
        regular_crops(images(1, size=16), 20)


def test_a_plain_image_folder_is_read_in_chunks(tmp_path):
    """COCO's val2014/ as it comes: image files without metadata, sorted by name, decoded a chunk at a time."""
    from PIL import Image

    imgs = images(3, size=20)
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(tmp_path / f"COCO_val2014_{i:012d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    chunks = list(real_image_chunks(tmp_path, 20, chunk=2))
    assert [len(c) for c in chunks] == [2, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), imgs)
    assert [len(c) for c in real_image_chunks(tmp_path, 16, limit=2)] == [2]


def test_missing_weights_are_errors_naming_the_path(tmp_path, tiny):
    from dmdscale.evaluate import main
    from dmdscale.families.sd import check_eval_models

    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none.pt")):
        load_inception(tmp_path / "none.pt")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no-clip")):
        load_clip(tmp_path / "no-clip")
    with pytest.raises(FileNotFoundError, match="could not load a CLIP model from 'someone/clip-model' without"):
        load_clip("someone/clip-model")  # a hub id not in the cache: no download
    cfg = build_config({}, {"model.family": "sd15", "model.teacher": tiny["sd15"], "data.channels": 3,
                            "eval.feature_extractor": "inception", "eval.inception_weights": str(tmp_path / "i.pt"),
                            "eval.clip_model": str(tmp_path / "clip")})
    with pytest.raises(FileNotFoundError, match=f"eval.inception_weights: .* not at {tmp_path / 'i.pt'}"):
        check_eval_models(cfg)
    with pytest.raises(ConfigError, match="eval.clip_model"):
        build_config({}, {"eval.feature_extractor": "clip"})
    (tmp_path / "prompts.txt").write_text("a\nb\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--student", tiny["sd15"], "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "o"),
              "--resolution", "32"])
    assert exit_info.value.code == 2  # the tiny teacher is no exported student: no dmdscale.json
