"""dmdscale.data.sources against real files and a real local Ray cluster (no mocks).

Ray passes are the slow part (seconds each on 2 cores), so each Ray test checks several things
in one pass; everything that needs no cluster (schemas, validation, the plain reader) runs
without one.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image
from sklearn.datasets import load_digits

from dmdscale.data.sources import (
    DataError,
    build_digits_parquet,
    build_imagefolder,
    check_source,
    decode_image,
    inspect_dataset,
    kept_decoded,
    load_arrays,
    read_dataset,
)
from dmdscale.data.sources import _keeps_decoded

GARBAGE = [b"not an image", b"", None, b"\x89PNG\r\n\x1a\n" + b"\x00" * 40]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-CPU Ray for the module; only shut down if this module started it."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict[str, Path]:
    return build_digits_parquet(tmp_path_factory.mktemp("digits"))


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _labels(path: Path) -> np.ndarray:
    return pq.read_table(path, columns=["label"]).column("label").to_numpy()


def _mixed_parquet(path: Path, digits_test: Path, good: int) -> tuple[Path, np.ndarray]:
    """`good` real digit rows interleaved with every kind of garbage; returns (path, good labels)."""
    table = pq.read_table(digits_test).slice(0, good)
    images = table.column("image").to_pylist()
    labels = table.column("label").to_pylist()
    bad_labels = [100 + i for i in range(len(GARBAGE))]  # never a real class: must never appear
    mixed_images, mixed_labels = [], []
    for i, (img, y) in enumerate(zip(images, labels)):
        mixed_images.append(img)
        mixed_labels.append(y)
        if i < len(GARBAGE):
            mixed_images.append(GARBAGE[i])
            mixed_labels.append(bad_labels[i])
    pq.write_table(
        pa.table({"image": pa.array(mixed_images, pa.binary()), "label": pa.array(mixed_labels, pa.int64())}), path
    )
    return path, np.array(labels)


# --------------------------------------------------------------------------- digits builder


def test_digits_parquet_split_schema_and_pixels(digits):
    train, test = pq.read_table(digits["train"]), pq.read_table(digits["test"])
    assert train.num_rows + test.num_rows == 1797
    assert test.num_rows == pytest.approx(0.2 * 1797, abs=1)
    for table in (train, test):
        assert table.schema.field("image").type == pa.binary()
        assert table.schema.field("label").type == pa.int64()
        assert table.schema.field("prompt").type == pa.string()

    # Stratified: every class in the test set, in proportion to the source.
    source_counts = np.bincount(load_digits().target, minlength=10)
    test_counts = np.bincount(_labels(digits["test"]), minlength=10)
    assert (test_counts > 0).all()
    np.testing.assert_allclose(test_counts, 0.2 * source_counts, atol=1)
    np.testing.assert_array_equal(test_counts + np.bincount(_labels(digits["train"]), minlength=10), source_counts)

    row = test.slice(0, 1).to_pylist()[0]
    assert row["prompt"] == f"a handwritten digit {row['label']}"
    with Image.open(io.BytesIO(row["image"])) as img:
        assert img.format == "PNG" and img.mode == "L" and img.size == (8, 8)
    # 0..16 scaled to 0..255: only the 17 levels round(v * 255 / 16) occur, and 255 does.
    pixels = np.concatenate([np.asarray(Image.open(io.BytesIO(b))).ravel() for b in test.column("image").to_pylist()])
    assert set(np.unique(pixels)) <= set(np.round(np.arange(17) * 255 / 16).astype(int))
    assert pixels.max() == 255


def test_digits_parquet_is_idempotent(digits):
    before = {k: p.stat().st_mtime_ns for k, p in digits.items()}
    again = build_digits_parquet(digits["train"].parent)
    assert again == digits
    assert {k: p.stat().st_mtime_ns for k, p in again.items()} == before


# --------------------------------------------------------------------------- decoding, plain reader


def test_decode_image_resizes_converts_and_rejects_garbage():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    up = decode_image(_png(gray), 16, 1)
    assert up.shape == (16, 16, 1) and up.dtype == np.uint8
    assert up.min() >= gray.min() and up.max() <= gray.max()  # bilinear never overshoots
    rgb = decode_image(_png(gray), 12, 3)
    assert rgb.shape == (12, 12, 3)
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])  # gray -> RGB keeps channels equal
    for bad in GARBAGE:
        assert decode_image(bad, 16, 1) is None


def test_load_arrays_digits_matches_source(digits):
    images, labels, skipped = load_arrays(digits["test"], 16, 1, require_labels=True)
    assert images.shape == (len(_labels(digits["test"])), 16, 16, 1)
    assert images.dtype == np.uint8 and labels.dtype == np.int64 and skipped == 0
    np.testing.assert_array_equal(labels, _labels(digits["test"]))


def test_parquet_folder_is_one_source(tmp_path, digits):
    table = pq.read_table(digits["test"])
    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(table.slice(0, 100), folder / "part-0.parquet")
    pq.write_table(table.slice(100), folder / "part-1.parquet")
    assert check_source(folder, require_labels=True) == "parquet"
    images, labels, skipped = load_arrays(folder, 8, 1, require_labels=True)
    assert len(images) == table.num_rows and skipped == 0
    assert sorted(labels) == sorted(table.column("label").to_pylist())


# --------------------------------------------------------------------------- validation errors


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope.parquet"
    for call in (
        lambda: check_source(missing, require_labels=False),
        lambda: load_arrays(missing, 16, 1),
        lambda: read_dataset(missing, 16, 1),
    ):
        with pytest.raises(DataError, match="nope.parquet"):
            call()


def test_require_labels_on_parquet_without_label(tmp_path, digits):
    path = tmp_path / "unlabelled.parquet"
    pq.write_table(pq.read_table(digits["test"], columns=["image", "prompt"]), path)
    assert check_source(path, require_labels=False) == "parquet"
    with pytest.raises(DataError, match=r"unlabelled\.parquet.*'label'"):
        check_source(path, require_labels=True)
    with pytest.raises(DataError, match="'label'"):
        read_dataset(path, 16, 1, require_labels=True)  # fails on the driver, before any Ray work


def test_parquet_without_image_column(tmp_path):
    path = tmp_path / "noimage.parquet"
    pq.write_table(pa.table({"label": pa.array([1, 2], pa.int64())}), path)
    with pytest.raises(DataError, match=r"noimage\.parquet.*'image'"):
        check_source(path, require_labels=False)


def test_imagefolder_metadata_errors(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(np.zeros((4, 4), np.uint8)))
    with pytest.raises(DataError, match=r"imgs.*metadata\.jsonl"):
        check_source(folder, require_labels=False)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "zero"}) + "\n")
    assert check_source(folder, require_labels=False) == "imagefolder"
    with pytest.raises(DataError, match=r"metadata\.jsonl.*'label'"):
        check_source(folder, require_labels=True)
    (folder / "metadata.jsonl").write_text(json.dumps({"text": "no file"}) + "\n")
    with pytest.raises(DataError, match="'file_name'"):
        check_source(folder, require_labels=False)


# --------------------------------------------------------------------------- Ray Data


def test_read_dataset_feeds_torch_batches(ray_cluster, digits):
    expected_images, expected_labels, _ = load_arrays(digits["train"], 16, 1, require_labels=True)
    ds = read_dataset(digits["train"], 16, 1, require_labels=True, num_cpus=1)
    labels, pixel_sum = [], 0.0
    for batch in ds.iter_torch_batches(batch_size=128, drop_last=False):
        image, label = batch["image"], batch["label"]
        assert image.dtype.is_floating_point and str(image.dtype) == "torch.float32"
        assert tuple(image.shape[1:]) == (1, 16, 16) and str(label.dtype) == "torch.int64"
        assert image.min() >= -1.0 and image.max() <= 1.0
        labels.append(label.numpy())
        pixel_sum += float(image.double().sum())
    labels = np.concatenate(labels)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.bincount(expected_labels, minlength=10))
    # Same decode as the plain reader: the normalised pixel totals agree.
    assert pixel_sum == pytest.approx(float((expected_images / 127.5 - 1.0).sum()), rel=1e-6)


def test_read_dataset_honours_resolution_with_drop_last(ray_cluster, digits):
    ds = read_dataset(digits["test"], 12, 1, require_labels=True)
    shapes = [tuple(b["image"].shape) for b in ds.iter_torch_batches(batch_size=64, drop_last=True)]
    assert shapes == [(64, 1, 12, 12)] * (pq.read_metadata(digits["test"]).num_rows // 64)


def test_small_data_sets_are_decoded_once_into_the_object_store(ray_cluster, digits):
    from ray.data.dataset import MaterializedDataset

    rows = pq.read_metadata(digits["test"]).num_rows
    ds = read_dataset(digits["test"], 16, 1, require_labels=True)
    cached, stats = kept_decoded(ds, digits["test"], 16, 1, "auto", require_labels=True)
    assert isinstance(cached, MaterializedDataset) and cached.count() == rows
    assert (stats.usable, stats.skipped) == (rows, 0)
    streamed, streamed_stats = kept_decoded(ds, digits["test"], 16, 1, "never", require_labels=True)
    assert not isinstance(streamed, MaterializedDataset) and streamed_stats == stats  # counted by the flag pass
    # Too big for a quarter of the store: streamed each epoch instead.
    assert _keeps_decoded(rows, 16, 1, "auto") and not _keeps_decoded(10**9, 1024, 3, "auto")
    labels = [int(x) for b in cached.iter_batches(batch_size=None) for x in b["label"]]
    assert sorted(labels) == sorted(int(r["label"]) for r in ds.take_all())


def test_corrupt_rows_are_skipped_and_counted(ray_cluster, tmp_path, digits):
    path, good_labels = _mixed_parquet(tmp_path / "mixed.parquet", digits["test"], good=12)
    stats = inspect_dataset(path, 16, 1, require_labels=True)
    assert (stats.usable, stats.skipped, stats.kind) == (12, len(GARBAGE), "parquet")
    # Decoded once and counted from the result: the same figures as the flag pass.
    kept, kept_stats = kept_decoded(read_dataset(path, 16, 1, require_labels=True), path, 16, 1, "always", True)
    assert kept_stats == stats and kept.count() == 12

    rows = read_dataset(path, 16, 1, require_labels=True).take_all()
    assert sorted(r["label"] for r in rows) == sorted(good_labels.tolist())  # no garbage label leaks
    assert all(r["image"].shape == (1, 16, 16) for r in rows)

    images, labels, skipped = load_arrays(path, 16, 1, require_labels=True)
    assert (len(images), skipped) == (12, len(GARBAGE))
    np.testing.assert_array_equal(labels, good_labels)


def test_no_usable_rows_is_an_error_naming_the_path(ray_cluster, tmp_path):
    path = tmp_path / "all_bad.parquet"
    pq.write_table(pa.table({"image": pa.array(GARBAGE, pa.binary())}), path)
    with pytest.raises(DataError, match=r"all_bad\.parquet.*no usable rows"):
        inspect_dataset(path, 16, 1)
    with pytest.raises(DataError, match=r"all_bad\.parquet.*no usable rows \(4 row"):
        kept_decoded(read_dataset(path, 16, 1), path, 16, 1, "always")


def test_imagefolder_reads_with_prompts_and_labels(ray_cluster, tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]
    images = [np.full((10, 10, 3), c, np.uint8) for c in colours]
    folder = build_imagefolder(tmp_path / "folder", images, [f"colour {i}" for i in range(4)], labels=[0, 1, 2, 3])
    # Two bad lines: a file that is not an image, and a file that does not exist.
    (folder / "broken.png").write_bytes(b"garbage")
    with (folder / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "broken.png", "text": "bad", "label": 7}) + "\n")
        f.write(json.dumps({"file_name": "missing.png", "text": "gone", "label": 8}) + "\n")
    assert check_source(folder, require_labels=True) == "imagefolder"

    rows = read_dataset(folder, 8, 3, require_labels=True, keep_prompts=True).take_all()
    by_label = {int(r["label"]): r for r in rows}
    assert sorted(by_label) == [0, 1, 2, 3]
    for label, colour in enumerate(colours):
        row = by_label[label]
        assert row["prompt"] == f"colour {label}"
        assert row["image"].shape == (3, 8, 8) and row["image"].dtype == np.float32
        np.testing.assert_allclose(row["image"][:, 0, 0], np.array(colour) / 127.5 - 1.0, atol=1e-6)

    arrays, labels, skipped = load_arrays(folder, 8, 3, require_labels=True)
    assert arrays.shape == (4, 8, 8, 3) and skipped == 2
    np.testing.assert_array_equal(labels, [0, 1, 2, 3])


def test_a_prompt_list_counts_every_prompt_as_a_row_in_either_pass(ray_cluster, tmp_path):
    """Text stages without the GAN train on prompts alone: nothing to decode, every prompt a row,
    counted alike by the flag pass and the one-pass path; an empty list is an error naming it."""
    from dmdscale.data.sources import read_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\na blue ball\na green cone\n")
    stats = inspect_dataset(prompts, 16, 3)
    assert (stats.usable, stats.skipped, stats.kind) == (3, 0, "prompts")
    kept, kept_stats = kept_decoded(read_prompts(prompts), prompts, 16, 3, "always")
    assert kept_stats == stats and kept.count() == 3
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.txt: no prompts"):
        inspect_dataset(empty, 16, 3)
