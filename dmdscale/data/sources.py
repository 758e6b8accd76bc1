"""Ray Data readers, preprocessing and dataset builders.

Two kinds of source satisfy the Datasets contract (see DESIGN.md):

* Parquet: one ``.parquet`` file or a folder of them, with an ``image`` column of encoded
  PNG/JPEG bytes and a ``prompt`` (str) and/or ``label`` (int) column;
* an image folder holding ``metadata.jsonl`` whose lines are
  ``{"file_name": ..., "text": ..., "label": ...}`` (the Hugging Face imagefolder convention).

Text-to-image stages that never look at a real image (no GAN term; the regression stage's
teacher ODE pairs) also take prompts alone: a ``.txt`` file with one prompt per line, or
Parquet with a ``prompt`` column and no ``image`` column (:func:`is_prompt_only`,
:func:`read_prompts`); every reader that needs images refuses them by name.

Both the Ray path (:func:`read_dataset`, used by the train workers) and the plain path
(:func:`load_arrays`, used by teacher training, the classifier and FID references) decode
through :func:`decode_image`, so the two can never disagree about what an image is.
Undecodable rows are skipped and counted, never raised: one bad file must not kill a run.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.json as pajson
import pyarrow.parquet as pq
from PIL import Image

from dmdscale.data.images import to_model_space
from dmdscale.errors import UserError

__all__ = [
    "DataError",
    "DatasetStats",
    "build_digits_parquet",
    "build_imagefolder",
    "decode_image",
    "load_arrays",
    "load_prompts",
    "is_prompt_only",
    "read_prompts",
    "count_prompts",
    "check_source",
    "read_dataset",
    "inspect_dataset",
    "kept_decoded",
]

METADATA_FILE = "metadata.jsonl"
PROMPT_LIST_SUFFIX = ".txt"  # a prompt-only source: one prompt per line
# Rows per map_batches call: small enough that a batch of 1024x1024 RGB float32 images stays
# in the hundreds of megabytes, large enough that per-call overhead is negligible.
DECODE_BATCH_SIZE = 32
_MODES = {1: "L", 3: "RGB"}
# What PIL raises on bytes that are not a readable image (truncated, garbage, bombs, None).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, TypeError, Image.DecompressionBombError)
# Ray Data's Parquet reader starts this many footer-reading actors (default 32) each time it
# lists files, i.e. every epoch; on a 2-CPU node with one file that is seconds of process
# start-up per epoch. Unless the user set it, dmdscale uses one actor per file, up to 32.
_FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
_USER_SET_FOOTER_ACTORS = _FOOTER_ACTORS_ENV in os.environ


class DataError(UserError, ValueError):
    """A data source that cannot be used; the message names the path and what is missing."""


@dataclass(frozen=True)
class DatasetStats:
    """Result of the preflight pass: how many rows decode, how many are skipped."""

    usable: int
    skipped: int
    kind: str


@dataclass(frozen=True)
class _Source:
    """A validated source: where its rows live and which optional columns it carries."""

    kind: str  # "parquet", "imagefolder" or "prompts" (a .txt prompt list)
    root: Path  # the path the user gave
    files: tuple[str, ...]  # the Parquet files, the one metadata.jsonl or the one prompt list
    has_label: bool
    has_prompt: bool
    has_image: bool = True  # False: prompts only (allowed where the caller says so)


# --------------------------------------------------------------------------- builders


def build_digits_parquet(out_dir: str | os.PathLike, test_fraction: float = 0.2, seed: int = 0) -> dict[str, Path]:
    """Write scikit-learn's 8x8 digits as train/test Parquet files in the contract format.

    The digits ship with scikit-learn, so the demo and tests have real images without any
    download. The split is stratified so every class appears in the test set. Idempotent: if
    both files already exist they are returned untouched (several runs may share one folder).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    out = Path(out_dir)
    paths = {"train": out / "train.parquet", "test": out / "test.parquet"}
    if all(p.exists() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    splits = train_test_split(
        pixels, digits.target, test_size=test_fraction, stratify=digits.target, random_state=seed
    )
    for name, images, labels in (("train", splits[0], splits[2]), ("test", splits[1], splits[3])):
        _write_parquet_atomically(_digits_table(images, labels), paths[name])
    return paths


def _digits_table(images: np.ndarray, labels: np.ndarray) -> pa.Table:
    """Encode uint8 8x8 arrays as grayscale PNG rows with labels and prompts."""
    return pa.table(
        {
            "image": pa.array([_png_bytes(img) for img in images], type=pa.binary()),
            "label": pa.array(labels.astype(np.int64), type=pa.int64()),
            "prompt": pa.array([f"a handwritten digit {int(y)}" for y in labels], type=pa.string()),
        }
    )


def _png_bytes(image: np.ndarray) -> bytes:
    """PNG-encode one uint8 H x W (or H x W x 1) grayscale or H x W x 3 RGB array."""
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def build_imagefolder(
    out_dir: str | os.PathLike,
    images: Sequence[np.ndarray],
    texts: Sequence[str],
    labels: Sequence[int] | None = None,
) -> Path:
    """Write uint8 images as PNG files plus metadata.jsonl (the Hugging Face imagefolder layout).

    Lets users and tests produce the second contract format from arrays; returns the folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, text) in enumerate(zip(images, texts, strict=True)):
        name = f"{i:06d}.png"
        (out / name).write_bytes(_png_bytes(image))
        row = {"file_name": name, "text": text}
        if labels is not None:
            row["label"] = int(labels[i])
        lines.append(json.dumps(row) + "\n")
    (out / METADATA_FILE).write_text("".join(lines))
    return out


def _write_parquet_atomically(table: pa.Table, path: Path) -> None:
    """Write then rename, so a concurrent reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- decoding


def decode_image(data: bytes | None, resolution: int, channels: int) -> np.ndarray | None:
    """Decode encoded image bytes to uint8 ``resolution x resolution x channels``.

    Returns None (rather than raising) when the bytes are not a readable image, so callers
    can skip and count bad rows. BILINEAR resizing also upsamples the 8x8 digits to 16x16.
    """
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert(_MODES[channels])
            img = img.resize((resolution, resolution), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except _DECODE_ERRORS:
        return None
    return array.reshape(resolution, resolution, channels)


def _read_bytes(path: Path) -> bytes | None:
    """File contents, or None when the file is missing or unreadable (counted as skipped)."""
    try:
        return path.read_bytes()
    except OSError:
        return None


def _decode_all(data: Sequence[bytes | None], resolution: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode a batch; returns (uint8 images N_ok x H x W x C, boolean keep mask over the batch)."""
    decoded = [decode_image(d, resolution, channels) for d in data]
    keep = np.array([d is not None for d in decoded], dtype=bool)
    good = [d for d in decoded if d is not None]
    images = np.stack(good) if good else np.zeros((0, resolution, resolution, channels), np.uint8)
    return images, keep


# --------------------------------------------------------------------------- validation


def check_source(path: str | os.PathLike, require_labels: bool, require_prompts: bool = False,
                 num_classes: int | None = None, allow_prompt_only: bool = False) -> str:
    """Validate a source on the driver before any cluster work; returns its kind.

    Reads only Parquet schemas, the label column (with `num_classes`: every label must be in
    [0, num_classes)) or the small metadata.jsonl, never the images, so a wrong path, a missing
    column or a label the model has no class for fails in a second with a message naming it,
    instead of deep inside a Ray task after the cluster has started. `allow_prompt_only`: a
    source of prompts without images passes (see the module docstring).
    """
    source = _describe(path, require_labels, allow_prompt_only)
    if num_classes is not None and source.has_label:
        for file in source.files:
            _check_labels(file, _labels_of(source, file), num_classes)
    if require_prompts and not source.has_prompt:
        column = "'text' in metadata.jsonl" if source.kind == "imagefolder" else "column 'prompt'"
        raise DataError(f"{source.root}: text-to-image training needs captions: {column} is missing")
    return source.kind


def _labels_of(source: _Source, file: str) -> np.ndarray:
    if source.kind == "imagefolder":
        return _read_metadata(Path(file)).column("label").to_numpy(zero_copy_only=False)
    return pq.read_table(file, columns=["label"]).column("label").to_numpy(zero_copy_only=False)


def _check_labels(file: str, labels: np.ndarray, num_classes: int) -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise DataError(f"{file}: {int(bad.sum())} of {len(labels)} rows have labels outside [0, {num_classes}) "
                        f"(found {int(labels.min())}..{int(labels.max())}); set data.num_classes to at least "
                        f"{int(labels.max()) + 1} or fix the labels")


def _describe(path: str | os.PathLike, require_labels: bool, allow_prompt_only: bool = False) -> _Source:
    """Classify and validate a source (see check_source)."""
    root = Path(path)
    if not root.exists():
        raise DataError(f"data path does not exist: {root}")
    if root.is_file() and root.suffix == PROMPT_LIST_SUFFIX:
        if not allow_prompt_only or require_labels:
            raise DataError(f"{root}: a prompt list (one prompt per line) holds no images"
                            + (" or labels" if require_labels else "") + ", which this use of it needs")
        return _Source("prompts", root, (str(root),), False, True, has_image=False)
    if root.is_dir() and (root / METADATA_FILE).exists():
        return _describe_imagefolder(root, require_labels)
    files = _parquet_files(root)
    if not files:
        raise DataError(
            f"{root}: not a Parquet file or folder of .parquet files, "
            f"and no {METADATA_FILE} for an image folder"
        )
    return _describe_parquet(root, files, require_labels, allow_prompt_only)


def _parquet_files(root: Path) -> list[Path]:
    """The .parquet files a path denotes: itself, or those anywhere under the folder."""
    if root.is_file():
        return [root] if root.suffix == ".parquet" else []
    return sorted(p for p in root.rglob("*.parquet") if p.is_file())


def _describe_parquet(root: Path, files: list[Path], require_labels: bool, allow_prompt_only: bool = False) -> _Source:
    """Check every file's schema (cheap: footer only) for the required columns; with
    `allow_prompt_only`, files with a prompt column and no image column are prompts only."""
    names = None
    has_image = True
    for file in files:
        try:
            schema = pq.read_schema(file)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{file}: not a readable Parquet file ({exc})") from exc
        if allow_prompt_only and not require_labels and "image" not in schema.names and "prompt" in schema.names:
            has_image = False
        else:
            _require_columns(file, schema.names, require_labels)
        if require_labels and not pa.types.is_integer(schema.field("label").type):
            raise DataError(f"{file}: column 'label' must be integer, got {schema.field('label').type}")
        names = set(schema.names) if names is None else names & set(schema.names)
    return _Source("parquet", root, tuple(map(str, files)), "label" in names and has_image, "prompt" in names,
                   has_image)


def _require_columns(where: Path, names: Sequence[str], require_labels: bool, image: str = "image") -> None:
    """Raise DataError naming the first missing required column."""
    required = [image] + (["label"] if require_labels else [])
    for column in required:
        if column not in names:
            raise DataError(f"{where}: required column '{column}' is missing (found: {sorted(names)})")


def _describe_imagefolder(root: Path, require_labels: bool) -> _Source:
    """Check that metadata.jsonl parses and every line names a file (and a label if needed)."""
    metadata = root / METADATA_FILE
    table = _read_metadata(metadata)
    _require_columns(metadata, table.column_names, require_labels, image="file_name")
    for column in ["file_name"] + (["label"] if require_labels else []):
        nulls = table.column(column).null_count
        if nulls:
            raise DataError(f"{metadata}: {nulls} line(s) have no '{column}'")
    if require_labels and not pa.types.is_integer(table.schema.field("label").type):
        raise DataError(f"{metadata}: 'label' must be an integer, got {table.schema.field('label').type}")
    has_label = "label" in table.column_names and table.column("label").null_count == 0
    has_prompt = "text" in table.column_names
    return _Source("imagefolder", root, (str(metadata),), has_label, has_prompt)


def _read_metadata(metadata: Path) -> pa.Table:
    """Parse metadata.jsonl with pyarrow, turning parse errors into DataError."""
    try:
        return pajson.read_json(metadata)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{metadata}: not valid JSON lines ({exc})") from exc


# --------------------------------------------------------------------------- plain reader


def load_arrays(
    path: str | os.PathLike, resolution: int, channels: int, require_labels: bool = False
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Read a whole source into memory without Ray: (uint8 N x H x W x C, int64 labels or None, skipped).

    For the consumers that need everything at once on one process (teacher training, the
    digit classifier, FID reference statistics) and must not start a cluster.
    """
    source = _describe(path, require_labels)
    table = _read_table(source)
    data = _image_bytes(source, table.to_pydict())
    images, keep = _decode_all(data, resolution, channels)
    labels = None
    if source.has_label:
        labels = table.column("label").to_numpy(zero_copy_only=False).astype(np.int64)[keep]
    return images, labels, int((~keep).sum())


def load_prompts(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """The captions of a source, in row order (for evaluation prompts), without decoding images."""
    source = _describe(path, require_labels=False, allow_prompt_only=True)
    if not source.has_prompt:
        raise DataError(f"{source.root}: no captions ('prompt' column or 'text' in {METADATA_FILE})")
    if source.kind == "prompts":
        return _prompt_lines(source.root)[:limit]
    if source.kind == "imagefolder":
        prompts = _read_metadata(Path(source.files[0])).column("text")
    else:
        prompts = pds.dataset(list(source.files), format="parquet").to_table(columns=["prompt"]).column("prompt")
    return [str(p) for p in prompts.to_pylist()[:limit]]


def _prompt_lines(path: Path) -> list[str]:
    """A prompt list's prompts: its non-empty lines, stripped."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def is_prompt_only(path: str | os.PathLike) -> bool:
    """True when a source holds prompts and no images (a .txt prompt list, or Parquet with a
    prompt column and no image column)."""
    return not _describe(path, require_labels=False, allow_prompt_only=True).has_image


def _row_count(source: _Source) -> int:
    """Rows before decoding: the Parquet footers, metadata.jsonl's lines or the prompt list's."""
    if source.kind == "prompts":
        return len(_prompt_lines(source.root))
    if source.kind == "imagefolder":
        return _read_metadata(Path(source.files[0])).num_rows
    return sum(pq.ParquetFile(f).metadata.num_rows for f in source.files)


def count_prompts(path: str | os.PathLike) -> int:
    """The rows of a prompt-only source (its Parquet footers, or its prompt list's lines)."""
    source = _describe(path, require_labels=False, allow_prompt_only=True)
    count = _row_count(source)
    if count == 0:
        raise DataError(f"{source.root}: no prompts")
    return count


def _read_table(source: _Source) -> pa.Table:
    """The source's rows as one Arrow table, with only the columns we use."""
    if source.kind == "imagefolder":
        return _read_metadata(Path(source.files[0]))
    columns = ["image"] + (["label"] if source.has_label else [])
    return pds.dataset(list(source.files), format="parquet").to_table(columns=columns)


def _image_bytes(source: _Source, batch: dict[str, Any]) -> list[bytes | None]:
    """Encoded bytes per row: the image column, or the files an image folder names."""
    if source.kind == "parquet":
        return list(batch["image"])
    return [_read_bytes(source.root / str(name)) for name in batch["file_name"]]


# --------------------------------------------------------------------------- Ray Data


def read_dataset(
    path: str | os.PathLike,
    resolution: int,
    channels: int,
    require_labels: bool = False,
    num_cpus: float = 1.0,
    keep_prompts: bool = False,
) -> "ray.data.Dataset":  # noqa: F821
    """A lazy Ray Dataset of model-ready rows: ``image`` float32 C x H x W in [-1, 1], ``label`` int64.

    Decoding happens in map_batches on the cluster, streamed to the train workers; undecodable
    rows are dropped there. ``num_cpus`` is per decode task: the trainer plans it so Ray Data
    keeps CPUs next to the train workers (on 2 cores, one each). ``keep_prompts`` adds a string
    ``prompt`` column for text models; strings cannot go through iter_torch_batches' default
    collation, so those callers tokenise it in a further map_batches first.
    """
    source = _describe(path, require_labels)
    return _raw_dataset(source).map_batches(
        _decode_batch,
        batch_format="numpy",
        batch_size=DECODE_BATCH_SIZE,
        num_cpus=num_cpus,
        fn_kwargs={"source": source, "resolution": resolution, "channels": channels, "keep_prompts": keep_prompts},
    )


def read_prompts(path: str | os.PathLike) -> "ray.data.Dataset":  # noqa: F821
    """A lazy Ray Dataset of one string column, ``prompt``, from any source with captions
    (a prompt list, Parquet's prompt column, or metadata.jsonl's text); images are not read."""
    import ray.data

    source = _describe(path, require_labels=False, allow_prompt_only=True)
    if not source.has_prompt:
        raise DataError(f"{source.root}: no captions ('prompt' column or 'text' in {METADATA_FILE})")
    if source.kind == "prompts":
        return ray.data.from_items([{"prompt": p} for p in _prompt_lines(source.root)])
    if source.kind == "imagefolder":
        return ray.data.read_json(list(source.files)).select_columns(["text"]).rename_columns({"text": "prompt"})
    return ray.data.read_parquet(list(source.files)).select_columns(["prompt"])


def inspect_dataset(
    path: str | os.PathLike, resolution: int, channels: int, require_labels: bool = False
) -> DatasetStats:
    """Preflight: decode every row once with Ray Data and count usable and skipped rows.

    Run before training so an empty or wholly corrupt source fails fast with a clear error,
    and so the skipped count can be reported, rather than workers silently waiting on no data.
    A prompt-only source (no images) has every prompt as a row.
    """
    source = _describe(path, require_labels, allow_prompt_only=True)
    if not source.has_image:  # prompts alone: nothing to decode
        rows = _row_count(source)
        return _stats(source, total=rows, usable=rows)
    flags = _raw_dataset(source).map_batches(
        _flag_batch,
        batch_format="numpy",
        batch_size=DECODE_BATCH_SIZE,
        fn_kwargs={"source": source, "resolution": resolution, "channels": channels},
    )
    total = usable = 0
    for batch in flags.iter_batches(batch_size=None, batch_format="numpy"):
        total, usable = total + len(batch["ok"]), usable + int(batch["ok"].sum())
    return _stats(source, total=total, usable=usable)


def _stats(source: _Source, total: int, usable: int) -> DatasetStats:
    """`total` rows before decoding, `usable` after; a prompt-only source has every prompt as a row."""
    if not source.has_image:
        if total == 0:
            raise DataError(f"{source.root}: no prompts")
        return DatasetStats(usable=total, skipped=0, kind="prompts")
    if usable == 0:
        raise DataError(f"{source.root}: no usable rows ({total} row(s), none decodable)")
    return DatasetStats(usable=usable, skipped=total - usable, kind=source.kind)


def _keeps_decoded(rows: int, resolution: int, channels: int, mode: str) -> bool:
    """Decode once into the object store when `mode` is "always", or "auto" and the decoded
    rows take at most a quarter of it. Otherwise every epoch re-reads and re-decodes, which
    costs little per row at scale but dominates a data set of a few thousand small images."""
    import ray

    decoded_bytes = rows * channels * resolution * resolution * 4  # float32
    return mode == "always" or (mode == "auto" and decoded_bytes <= 0.25 * ray.cluster_resources().get(
        "object_store_memory", 0))


def kept_decoded(ds: "ray.data.Dataset", path: str | os.PathLike, resolution: int, channels: int,  # noqa: F821
                 mode: str, require_labels: bool = False) -> tuple["ray.data.Dataset", DatasetStats]:  # noqa: F821
    """`ds` (the decoded rows of `path`, or what a row-preserving map made of them) and its
    DatasetStats, in one pass where the size allows: a source whose rows fit the object store
    (`_keeps_decoded`, on its row count before decoding) is decoded once and its
    usable rows counted from the result; a larger one is counted by `inspect_dataset`'s flag
    pass first and then streamed. Ray Data's fixed cost per pass is seconds on a small node."""
    source = _describe(path, require_labels, allow_prompt_only=True)
    total = _row_count(source)
    if not _keeps_decoded(total, resolution, channels, mode):
        return ds, inspect_dataset(path, resolution, channels, require_labels)
    ds = ds.materialize()
    return ds, _stats(source, total=total, usable=ds.count())


def _raw_dataset(source: _Source) -> "ray.data.Dataset":  # noqa: F821
    """Undecoded rows: Parquet columns, or metadata.jsonl lines (file bytes read later, lazily)."""
    import ray.data

    if source.kind == "imagefolder":
        return ray.data.read_json(list(source.files))
    columns = ["image"] + [c for c, ok in (("label", source.has_label), ("prompt", source.has_prompt)) if ok]
    if not _USER_SET_FOOTER_ACTORS:
        os.environ[_FOOTER_ACTORS_ENV] = str(min(32, len(source.files)))
    return ray.data.read_parquet(list(source.files)).select_columns(columns)


def _decode_batch(
    batch: dict[str, np.ndarray], source: _Source, resolution: int, channels: int, keep_prompts: bool
) -> dict[str, np.ndarray]:
    """map_batches body: decode, drop undecodable rows, normalise, keep label (and prompt)."""
    images, keep = _decode_all(_image_bytes(source, batch), resolution, channels)
    out = {"image": to_model_space(images).numpy()}
    if source.has_label:
        out["label"] = np.asarray(batch["label"])[keep].astype(np.int64)
    prompt_column = "text" if source.kind == "imagefolder" else "prompt"
    if keep_prompts and source.has_prompt:
        out["prompt"] = np.asarray(batch[prompt_column], dtype=object)[keep].astype(str)
    return out


def _flag_batch(batch: dict[str, np.ndarray], source: _Source, resolution: int, channels: int) -> dict[str, np.ndarray]:
    """map_batches body for inspect_dataset: one int64 ok flag per row."""
    _, keep = _decode_all(_image_bytes(source, batch), resolution, channels)
    return {"ok": keep.astype(np.int64)}


def source_paths(cfg: Any) -> tuple[str, str]:
    """(train, held-out) data paths of a run config; "digits" builds scikit-learn's digits (with
    captions such as "a handwritten digit 3") as Parquet with a held-out split under cache_dir."""
    if cfg.data.path == "digits":
        paths = build_digits_parquet(Path(cfg.cache_dir).expanduser() / "digits")
        return str(paths["train"]), str(paths["test"])
    return cfg.data.path, cfg.data.eval_path or cfg.data.path
