"""Checksums and damage: a damaged checkpoint is found before anything of it is loaded.

Each rank writes the sha256 of every file it wrote (checksums_rank<r>.json); a checkpoint
is verified against them before anything of it is loaded, and a resume falls back to the
newest checkpoint that verifies (`load_latest_good`). Each rank's state file and RNG file record
the checkpoint format (`dmdscale.distributed.checkpoint.state` writes them), so a checkpoint of
this format whose checksums are missing is damaged, not unchecked.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, TypeVar

from safetensors import safe_open

from dmdscale.errors import UserError, warn


def _checksum_file(rank: int) -> str:
    return f"checksums_rank{rank}.json"


CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train names checkpoint folders checkpoint_<timestamp>
# Format 2: checksums are always written, and each rank's state (JSON) and RNG file (safetensors
# metadata) say so; a checkpoint without the mark (format 1, older dmdscale) may lack checksums.
CHECKPOINT_FORMAT = 2
_FORMAT_KEY = "dmdscale_checkpoint_format"


class CheckpointMismatch(UserError, FileNotFoundError):
    """A checkpoint this run cannot resume from (another scale, a finished run's final one)."""


class CorruptCheckpoint(UserError, RuntimeError):
    """A checkpoint's file is missing or does not match the checksum saved with it. `detail`
    names the file and what is wrong, without the folder (which may be a local copy). A user
    error: retrying cannot mend it (the run's failure policy does not retry it)."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


def _damaged(directory: str | Path, detail: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"checkpoint {directory} is damaged: {detail}", detail)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):  # streamed: engine files are large
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory: str | Path, rank: int, world_size: int) -> None:
    """checksums_rank<rank>.json: sha256 and size of every file in `directory`, which holds
    only what this rank wrote (ranks save into their own folders; their file names differ)."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("checksums_rank"))
    record = {"world_size": world_size,
              "files": {p.relative_to(directory).as_posix(): {"sha256": _sha256(p), "size": p.stat().st_size}
                        for p in files}}
    (directory / _checksum_file(rank)).write_text(json.dumps(record, indent=1))


def _read_checksums(directory: Path, name: str) -> dict[str, Any]:
    try:
        record = json.loads((directory / name).read_text())
        return {"world_size": int(record["world_size"]), "files": dict(record["files"])}
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _damaged(directory, f"{name} is unreadable ({type(exc).__name__}: {exc})") from None


def verify_checkpoint(directory: str | Path) -> None:
    """Raise CorruptCheckpoint naming the first missing or altered file of `directory`.

    Every rank checks every rank's files, not only its own: all ranks then reach the same
    verdict without talking to each other, and fall back to the same checkpoint. A checkpoint
    of this format always has them (its state and RNG files say so: `_marked_ranks`); one
    without the mark and without checksum files (written before they existed) passes unchecked.
    """
    directory = Path(directory)
    records = {p.name: _read_checksums(directory, p.name) for p in sorted(directory.glob("checksums_rank*.json"))}
    unverifiable = _marked_ranks(directory, unchecked=lambda r: _checksum_file(r) not in records)
    if unverifiable:  # its checksums were deleted: its files cannot be checked
        rank, marked_by = min(unverifiable.items())
        raise _damaged(directory, f"{_checksum_file(rank)} is missing ({marked_by} says this checkpoint "
                                  f"was written with checksums)")
    for name, record in records.items():
        for rank in range(record["world_size"]):
            if _checksum_file(rank) not in records:  # a rank's upload never arrived
                raise _damaged(directory, f"{_checksum_file(rank)} is missing ({name} says "
                                          f"{record['world_size']} ranks wrote this checkpoint)")
    for name, record in records.items():
        for relative, expected in record["files"].items():
            path = directory / relative
            if not path.is_file():
                raise _damaged(directory, f"{relative} is missing (listed in {name})")
            if path.stat().st_size != expected["size"]:
                raise _damaged(directory, f"{relative} has {path.stat().st_size} bytes, "
                                          f"{name} says {expected['size']}")
            if _sha256(path) != expected["sha256"]:
                raise _damaged(directory, f"{relative} does not match its sha256 in {name}")


def _marked_ranks(directory: Path, unchecked: Callable[[int], bool]) -> dict[int, str]:
    """Of the ranks without checksums (`unchecked(rank)`), those whose files say they wrote
    this checkpoint with checksums (format 2 or later), each with the file that says so: its
    state file (JSON "format") or its RNG file (safetensors metadata), so that deleting one of
    them with the checksums still leaves the mark. Such a file that cannot be read is damage too."""
    marked: dict[int, str] = {}
    for path in sorted(directory.glob("training_state_rank*.json")):
        suffix = path.stem.removeprefix("training_state_rank")
        if not suffix.isdigit() or not unchecked(int(suffix)):
            continue
        try:
            record = json.loads(path.read_text())
            version = int(record.get("format", 1))
        except (ValueError, TypeError, AttributeError) as exc:  # JSONDecodeError, UnicodeDecodeError, not a record
            raise _damaged(directory, f"{path.name} is unreadable ({type(exc).__name__}: {exc})") from None
        if version >= 2:
            marked[int(suffix)] = path.name
    for path in sorted(directory.glob("rng_rank*.safetensors")):
        suffix = path.name.removeprefix("rng_rank").removesuffix(".safetensors")
        if not suffix.isdigit() or int(suffix) in marked or not unchecked(int(suffix)):
            continue
        try:
            with safe_open(str(path), "pt") as f:
                version = (f.metadata() or {}).get(_FORMAT_KEY)
        except Exception as exc:  # safetensors' own error type: a truncated or altered header
            raise _damaged(directory, f"{path.name} is unreadable ({str(exc).splitlines()[0]})") from None
        if version is not None and int(version) >= 2:
            marked[int(suffix)] = path.name
    return marked


def checkpoint_folders(filesystem: Any, directory: str) -> list[str]:
    """The checkpoint folders Ray Train wrote under `directory` (a path on `filesystem`), newest
    first (Ray names them checkpoint_<local time to the microsecond>)."""
    return sorted(_checkpoint_folders(filesystem, directory), key=lambda p: PurePosixPath(p).name, reverse=True)


def checkpoints_before(filesystem: Any, latest: str) -> list[str]:
    """The checkpoint folders beside `latest` (a path on `filesystem`) that Ray wrote before
    it, newest first. Ray names them checkpoint_<local time to the microsecond>, so name order
    is report order; folders named after `latest` (an upload that never completed) are left out."""
    latest_path = PurePosixPath(latest)
    siblings = _checkpoint_folders(filesystem, str(latest_path.parent))
    return sorted((p for p in siblings if PurePosixPath(p).name < latest_path.name), reverse=True)


def _checkpoint_folders(filesystem: Any, directory: str) -> list[str]:
    import pyarrow.fs

    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(directory, allow_not_found=True))
    return [info.path for info in infos
            if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(CHECKPOINT_PREFIX)]


T = TypeVar("T")


class _LocalCheckpoint:
    """A checkpoint folder on this machine, as `load_latest_good` takes checkpoints."""

    def __init__(self, path: str):
        self.path = path

    @contextlib.contextmanager
    def as_directory(self) -> Iterator[str]:
        yield self.path


def load_latest_good(checkpoints: Iterable[Any], load: Callable[[Path], T],
                     warn: Callable[[str], None] = warn) -> T:
    """`load` of the first of `checkpoints` (newest first) that is not damaged.

    A checkpoint is anything with `.path` (named in messages) and `.as_directory()` (a local
    copy), like `ray.train.Checkpoint`; the iterable may be lazy, so older ones are listed and
    fetched only when needed. `load` verifies before it loads anything (load_training_state).
    A damaged one costs a warning naming its bad file; when all are damaged, CorruptCheckpoint
    names each one's bad file.
    """
    damaged: list[tuple[str, str]] = []  # (checkpoint path, its bad file and what is wrong)
    for checkpoint in checkpoints:
        try:
            with checkpoint.as_directory() as local:
                return load(Path(local))
        except CorruptCheckpoint as exc:
            damaged.append((str(checkpoint.path), exc.detail))
            warn(f"checkpoint {checkpoint.path} is damaged ({exc.detail}); looking for an older one")
    if not damaged:
        raise ValueError("load_latest_good: no checkpoint given")
    bad_files = "; ".join(f"{path}: {detail}" for path, detail in damaged)
    run_folder = PurePosixPath(damaged[0][0]).parent
    raise CorruptCheckpoint(f"no undamaged checkpoint to resume from ({bad_files}); delete the run folder "
                            f"{run_folder} (or use another --out) to train afresh")
