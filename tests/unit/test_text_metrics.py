"""Text-to-image metrics (dmdscale.eval.text): CLIP score, reference statistics cache, patch
crops, clear errors for missing weights; on a tiny random-weight CLIPModel built offline."""
from __future__ import annotations

import json

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
from dmdscale.families.sd.tiny import build_tiny_clip

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
    from dmdscale.families.text2image import check_eval_models

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


def test_a_clip_folder_saved_by_clip_processor_passes_and_a_bad_one_is_a_user_error(clip_folder, tmp_path):
    """transformers 5's CLIPProcessor.save_pretrained writes processor_config.json (no
    preprocessor_config.json): accepted and loaded. A folder lacking parts is a UserError (the
    training CLI's and the evaluate command's one-line error), naming what is missing."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from dmdscale.errors import UserError
    from dmdscale.eval.text import ClipModelNotFound, check_clip_model

    saved = tmp_path / "saved"
    CLIPModel.from_pretrained(clip_folder).save_pretrained(saved)
    CLIPProcessor(image_processor=CLIPImageProcessor.from_pretrained(clip_folder),
                  tokenizer=CLIPTokenizer.from_pretrained(clip_folder)).save_pretrained(saved)
    assert not (saved / "preprocessor_config.json").exists()
    check_clip_model(saved)
    assert load_clip(saved).image_size == 32
    (saved / "processor_config.json").unlink()
    with pytest.raises(ClipModelNotFound, match="processor_config.json") as info:
        check_clip_model(saved, "eval.clip_model")
    assert isinstance(info.value, UserError) and isinstance(info.value, FileNotFoundError)
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "nowhere", tmp_path / "empty"):
        with pytest.raises(UserError, match=f"eval.clip_model: .*{bad.name}"):
            check_clip_model(bad)
    with pytest.raises(UserError):
        load_clip(tmp_path / "nowhere")


def test_read_stats_refuses_a_missing_corrupt_or_differently_measured_npz(tmp_path):
    """One UserError naming the flag and the file: missing, not a .npz, a .npz without the
    statistics, or statistics of another resolution (both named), extractor or patch size."""
    from dmdscale.errors import UserError

    key = {"source": "real@0123", "resolution": 64, "extractor": "inception", "patch_size": None}
    _, npz, _ = reference_stats(key, tmp_path, lambda: np.random.RandomState(0).randn(20, 4))
    expect = {"extractor": "inception", "patch_size": None, "resolution": 64}
    assert read_stats(npz, expect, "--reference-stats")["mu"].shape == (4,)
    with pytest.raises(UserError, match=rf"--reference-stats: {npz} .*resolution 64.* resolution 32"):
        read_stats(npz, {**expect, "resolution": 32}, "--reference-stats")
    with pytest.raises(UserError, match="patch_size None.*patch_size 299"):
        read_stats(npz, {**expect, "patch_size": 299}, "--reference-stats")
    with pytest.raises(UserError, match=f"--reference-stats: no .npz at {tmp_path / 'gone.npz'}"):
        read_stats(tmp_path / "gone.npz", expect, "--reference-stats")
    (tmp_path / "junk.npz").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="junk.npz is not a .npz file"):
        read_stats(tmp_path / "junk.npz", expect, "--reference-stats")
    np.savez(tmp_path / "other.npz", mu=np.zeros(4))
    with pytest.raises(UserError, match="other.npz is not reference statistics .* no sigma, count, key"):
        read_stats(tmp_path / "other.npz", expect, "--reference-stats")


def test_unreadable_real_images_are_skipped_counted_and_kept_in_the_npz(tmp_path):
    """Files that do not decode are left out and counted (a chunk of only bad files is empty, not
    a crash); the count is stored in the reference .npz, so a cached run still reports it. The
    early check passes while one of the first images decodes and fails when none does."""
    from PIL import Image

    from dmdscale.data.sources import DataError
    from dmdscale.eval.text import check_real_images

    real = tmp_path / "real"
    real.mkdir()
    (real / "a_bad.png").write_bytes(b"not a png")
    (real / "b_bad.jpg").write_bytes(b"")
    for i, img in enumerate(images(3, size=20)):
        Image.fromarray(img).save(real / f"c_{i}.png")
    skipped = []
    chunks = list(real_image_chunks(real, 16, chunk=2, on_skipped=skipped.append))
    assert [len(c) for c in chunks] == [0, 2, 1] and sum(skipped) == 2
    check_real_images(real, 16)  # c_0.png decodes
    with pytest.raises(DataError, match="none of its first 2 images"):
        check_real_images(real, 16, sample=2)

    def features():
        counted = []
        feats = np.concatenate([c.reshape(len(c), -1)[:, :8].astype(float)
                                for c in real_image_chunks(real, 16, on_skipped=counted.append) if len(c)])
        return feats, sum(counted)

    stats, npz, cached = reference_stats({"source": "real", "resolution": 16}, tmp_path / "cache", features)
    assert (int(stats["skipped"]), int(stats["count"]), cached) == (2, 3, False)
    again, _, cached = reference_stats({"source": "real", "resolution": 16}, tmp_path / "cache", features)
    assert (int(again["skipped"]), cached) == (2, True)


def test_reference_keys_and_extractor_ids_name_no_local_path(tmp_path, clip_folder):
    """The cache key (stored in the .npz) holds the folders' names and hashes of where they
    resolve, never the paths: one entry per location, nothing of the machine's layout."""
    from dmdscale.eval.reference import fid_extractor_id, reference_key

    real = tmp_path / "coco" / "val2014"
    real.mkdir(parents=True)
    for i in range(2):
        (real / f"{i}.png").write_bytes(b"x")
    clip_id = fid_extractor_id("clip", clip_folder)
    key = json.dumps(reference_key(real, 256, clip_id, None, None))
    assert str(tmp_path) not in key and str(clip_folder.parent) not in key and "/" not in key
    assert "val2014@" in key and clip_id.startswith(f"clip:{clip_folder.name}@")
    other = tmp_path / "elsewhere" / "val2014"
    other.mkdir(parents=True)
    assert reference_key(other, 256, clip_id, None, None)["source"] != json.loads(key)["source"]
    assert fid_extractor_id("inception", None) == "inception"
    assert fid_extractor_id("clip", "openai/clip-vit-base-patch32") == "clip:openai/clip-vit-base-patch32"


def test_the_student_resolution_is_read_from_its_files(tiny):
    from pathlib import Path

    from dmdscale.evaluate import student_resolution

    assert student_resolution(Path(tiny["sd15"]), {}) == 32  # unet sample_size 4 x vae factor 8
    assert student_resolution(Path(tiny["sd15"]), {"resolution": 48}) == 48
    assert student_resolution(Path("/nonexistent"), {}) is None


@pytest.mark.parametrize("gpus", [0, 1])
def test_more_generation_actors_than_the_cluster_holds_is_one_error(monkeypatch, gpus):
    """As training's ensure_fits: on a cluster that cannot grow, an immediate error naming
    --num-actors, what the actors need and what the cluster has, and how many would fit."""
    import ray

    import dmdscale.distributed.cluster as cluster
    from dmdscale.distributed.generation import ensure_actors_fit
    from dmdscale.errors import EvaluationError

    have = {"CPU": 16.0, **({"GPU": float(gpus)} if gpus else {})}
    monkeypatch.setattr(ray, "cluster_resources", lambda: have)
    monkeypatch.setattr(cluster, "may_autoscale", lambda: False)
    ensure_actors_fit(gpus or 16, 1.0, bool(gpus), 600)  # fits: no error
    with pytest.raises(EvaluationError) as info:
        ensure_actors_fit(1000, 1.0, bool(gpus), 600)
    message = str(info.value)
    assert message.startswith("--num-actors 1000:") and "16 CPU" in message
    assert f"at most {gpus or 16} fit" in message and (not gpus or "1 GPU" in message)
    with pytest.raises(EvaluationError, match="lower --actor-cpus"):
        ensure_actors_fit(1, 32.0, bool(gpus), 600)
    monkeypatch.setattr(cluster, "may_autoscale", lambda: True)  # joined by address: a bounded wait
    with pytest.raises(EvaluationError, match="--num-actors 1000"):
        ensure_actors_fit(1000, 1.0, bool(gpus), 0)
