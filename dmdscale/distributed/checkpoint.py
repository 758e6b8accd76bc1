"""What a worker saves to resume training where it stopped, and the run's attempt journal.

A checkpoint folder holds, per trainable module, DeepSpeed's own sharded engine checkpoint
(each rank writes its ZeRO partition of weights and optimizer state; the LR scheduler too), and
per rank its RNG states (safetensors) and data position (JSON). Everything is read back without
unpickling arbitrary objects: safetensors, JSON, and DeepSpeed files through `torch.load`
with `weights_only=True` (`dmdscale.distributed.engine.load_weights_only`).

Each rank also writes the sha256 of every file it wrote (checksums_rank<r>.json); a checkpoint
is verified against them before anything of it is loaded, and a resume falls back to the
newest checkpoint that verifies (`load_latest_good`). Each rank's state file and RNG file record
the checkpoint format, so a checkpoint of this format whose checksums are missing is damaged,
not unchecked. Rank 0 also writes the run's config (CONFIG_FILE): a run folder whose journal
is lost is resumed only under the config its checkpoints were written under.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, Protocol, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from dmdscale.config import ConfigError
from dmdscale.core.ema import ema_name
from dmdscale.errors import UserError, warn


def _state_file(rank: int) -> str:
    return f"training_state_rank{rank}.json"


def _checksum_file(rank: int) -> str:
    return f"checksums_rank{rank}.json"


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train names checkpoint folders checkpoint_<timestamp>
# Format 2: checksums are always written, and each rank's state (JSON) and RNG file (safetensors
# metadata) say so; a checkpoint without the mark (format 1, older dmdscale) may lack checksums.
CHECKPOINT_FORMAT = 2
_FORMAT_KEY = "dmdscale_checkpoint_format"
CONFIG_FILE = "dmdscale_config.json"  # rank 0: the run's flat config, in every checkpoint


class Checkpointable(Protocol):
    def save(self, directory: str | Path, tag: str) -> None: ...

    def load(self, directory: str | Path, tag: str) -> None: ...


@dataclass
class DataPosition:
    """Where a worker is in its data stream: `batch` batches consumed in epoch `epoch`.

    The reader runs ahead of the trainer (prefetching, rollout lookahead), so the position
    counts what the trainer consumed since this attempt started, and turns that into
    (epoch, batch) once the reader has seen how many batches an epoch holds.
    """

    epoch: int = 0
    batch: int = 0
    consumed: int = 0  # batches the trainer took since this attempt started at (epoch, batch)
    epoch_length: int | None = None  # set by the reader when it finishes its first epoch

    def now(self) -> tuple[int, int]:
        total = self.batch + self.consumed
        if not self.epoch_length:  # still in the first epoch the reader is producing
            return self.epoch, total
        return self.epoch + total // self.epoch_length, total % self.epoch_length


@dataclass
class TrainingState:
    step: int  # the next iteration to run
    data_epoch: int = 0
    data_batch: int = 0  # batches of data_epoch already consumed
    # Rank 0: the reports it logged so far (losses by step), so the run folder's train_log.json
    # is whole after a resume even if MLflow missed some. Other ranks: empty.
    logged: list[dict[str, float]] = field(default_factory=list)


def rng_states(step_rng: Any) -> dict[str, Tensor]:
    """This rank's random streams: torch's global one(s) and the step's noise stream."""
    states = {"torch": torch.get_rng_state(), "step": step_rng.get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, Tensor], step_rng: Any) -> None:
    torch.set_rng_state(states["torch"])
    step_rng.set_state(states["step"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save_training_state(directory: str | Path, state: TrainingState, modules: dict[str, Checkpointable],
                        rngs: dict[str, Tensor], rank: int, world_size: int | None = None,
                        config: dict[str, Any] | None = None) -> None:
    """Every rank calls this (engine saves are collective) into its own local folder, which Ray
    merges with the other ranks' in storage. `world_size`: the ranks writing this checkpoint
    (default: torch.distributed's world); `config`: the run's flat config, written by rank 0
    (`save_run_config`)."""
    directory = Path(directory)
    for tag, module in modules.items():
        module.save(directory, tag)
    save_file({k: v.contiguous() for k, v in rngs.items()}, directory / _rng_file(rank),
              metadata={_FORMAT_KEY: str(CHECKPOINT_FORMAT)})
    (directory / _state_file(rank)).write_text(json.dumps({**asdict(state), "format": CHECKPOINT_FORMAT}))
    if config is not None and rank == 0:
        save_run_config(directory, config)
    write_checksums(directory, rank, _world_size() if world_size is None else world_size)


def save_run_config(directory: str | Path, config: dict[str, Any]) -> None:
    """CONFIG_FILE: the flat config a checkpoint was written under, as the run journal records
    it; what rebuilds a lost journal (`RunJournal.begin`)."""
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(config, indent=1, default=str))


def load_training_state(directory: str | Path, modules: dict[str, Checkpointable],
                        rank: int) -> tuple[TrainingState, dict[str, Tensor]]:
    """Restore the modules in place; return this rank's state and RNG states. The checkpoint is
    verified first (CorruptCheckpoint), so a damaged one leaves no module half loaded."""
    directory = Path(directory)
    verify_checkpoint(directory)
    state_file = directory / _state_file(rank)
    if not state_file.is_file() and (directory / "train_metrics.json").is_file():
        raise CheckpointMismatch(
            f"checkpoint {directory} is the final one of a finished run (it holds the exported "
            f"student, not training state); delete the run's folder or use another --out")
    if not state_file.is_file():
        raise CheckpointMismatch(
            f"checkpoint {directory} has no {state_file.name}: it was written by fewer workers "
            f"than this run has (resuming needs the same scale.num_workers)")
    for tag, module in modules.items():
        module.load(directory, tag)
    record = json.loads(state_file.read_text())
    record.pop("format", None)
    return TrainingState(**record), load_file(directory / _rng_file(rank))


class CheckpointMismatch(UserError, FileNotFoundError):
    """A checkpoint this run cannot resume from (another scale, a finished run's final one)."""


# -- checksums: a damaged checkpoint is found before it is loaded -----------------------------
class CorruptCheckpoint(UserError, RuntimeError):
    """A checkpoint's file is missing or does not match the checksum saved with it. `detail`
    names the file and what is wrong, without the folder (which may be a local copy). A user
    error: retrying cannot mend it (the run's failure policy does not retry it)."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


def _damaged(directory: str | Path, detail: str) -> CorruptCheckpoint:
    return CorruptCheckpoint(f"checkpoint {directory} is damaged: {detail}", detail)


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


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


class EMACheckpoint:
    """The generator EMAs as a checkpoint part: every rank holds the same averages (ZeRO 0-2
    keep whole weights on each), so rank 0 writes them and every rank reads them back."""

    def __init__(self, ema: Any, rank: int):
        self.ema, self.rank = ema, rank

    def save(self, directory: str | Path, tag: str) -> None:
        if self.rank == 0:
            save_file({k: v.contiguous() for k, v in self.ema.state_dict().items()}, Path(directory) / f"{tag}.safetensors")

    def load(self, directory: str | Path, tag: str) -> None:
        self.ema.load_state_dict(load_file(Path(directory) / f"{tag}.safetensors"))


# -- stages: what a next run starts from (train.init) -------------------------------------------
STAGE_DIR = "stage"  # in the final checkpoint and the run folder
STAGE_PARTS = ("generator", "critic", "ema")
_FAMILY_KEY = "dmdscale_family"  # a stage file's safetensors metadata: the family that wrote it
# Where each family's generator keeps its network, by the teacher folder's subfolder: the
# generator's weights are "<subfolder>.<the teacher's weight name>" (LoRA layers aside).
_NETWORK_FOLDERS = ("unet", "transformer")


def save_stage(folder: str | Path, weights: dict[str, dict[str, Tensor] | None], family: str | None = None) -> Path:
    """folder/stage/<part>.safetensors for the parts given (generator: the raw trained weights;
    critic: fake score + head; ema: the averages): a later run's `train.init`. `family`
    (model.family) is recorded in each file's metadata, so that a run of another family refuses it."""
    stage = Path(folder) / STAGE_DIR
    stage.mkdir(parents=True, exist_ok=True)
    metadata = {_FAMILY_KEY: family} if family else None
    for part, state in weights.items():
        if state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, stage / f"{part}.safetensors",
                      metadata=metadata)
    return stage


def init_source(path: str | Path) -> tuple[str, Path]:
    """What `train.init` points at: ("stage", folder) for a run folder or its stage/ folder,
    ("student", folder) for an exported student (generator weights only). A clear error
    naming the key otherwise: checked on the driver before any cluster work."""
    from dmdscale.export import STUDENT_DIR, STUDENT_INFO

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"train.init: {folder} is not a folder (give a run folder or an exported student)")
    for candidate in (folder, folder / STAGE_DIR):
        if (candidate / "generator.safetensors").is_file():
            return "stage", candidate
    for candidate in (folder, folder / STUDENT_DIR):
        if (candidate / STUDENT_INFO).is_file():
            return "student", candidate
    raise ConfigError(f"train.init: {folder} holds neither a stage/ (written by every finished run) nor an "
                      f"exported student ({STUDENT_INFO})")


def _student_weights(folder: Path) -> Path:
    return folder / "unet" / "diffusion_pytorch_model.safetensors"


def _init_files(kind: str, folder: Path) -> list[Path]:
    """The weight files a run reads of train.init's `folder`."""
    if kind == "student":
        return [_student_weights(folder)]
    return [folder / f"{part}.safetensors" for part in STAGE_PARTS if (folder / f"{part}.safetensors").is_file()]


def _shapes(file: Path, key: str = "train.init") -> tuple[dict[str, list[int]], dict[str, str]]:
    """(tensor name -> shape, metadata) of a safetensors file, from its header only. safe_open
    checks that the header's offsets cover the file exactly, so a truncated (or extended) file
    is a ConfigError naming `key` and the file, not a failure when it is loaded."""
    try:
        with safe_open(str(file), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors' SafetensorError (not importable by a stable name), OSError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{key}: {file} is damaged or cut short ({reason}); copy it again from the run it "
                          f"came from, or start from another run") from None


def _check_family(kind: str, folder: Path, family: str) -> None:
    """An exported student's dmdscale.json and a stage's file metadata name the family that
    wrote them: another family's weights are refused here, not when a worker loads them."""
    from dmdscale.export import STUDENT_INFO

    if kind == "student":
        info = folder / STUDENT_INFO
        try:
            theirs = json.loads(info.read_text()).get("family")
        except (ValueError, AttributeError) as exc:
            raise ConfigError(f"train.init: {info} is unreadable ({type(exc).__name__}: {exc})") from None
        where = info
    else:
        theirs = _shapes(folder / "generator.safetensors")[1].get(_FAMILY_KEY)  # stages written before: unrecorded
        where = folder / "generator.safetensors"
    if theirs is not None and theirs != family:
        raise ConfigError(f"train.init: {folder} holds a {theirs} {'student' if kind == 'student' else 'stage'} "
                          f"({where.name} says so), but this run distils a {family} teacher (model.family); "
                          f"start from a {family} run")


def check_init(path: str | Path | None, generator_ema: float | None = None,
               family: str | None = None) -> tuple[str, Path] | None:
    """train.init (and train.init_ema, the EMA the generator starts from) checked on the driver
    before any cluster work, with a clear error naming the key; returns `init_source(path)`.
    Every weight file's header is read (a truncated file fails here), and with `family`
    (model.family) a student or stage of another family is refused. How its generator weights
    fit the teacher is `check_init_fits` (it needs the teacher's folder)."""
    if path is None:
        if generator_ema is not None:
            raise ConfigError("train.init_ema: set it only with train.init (the run whose EMA the generator starts from)")
        return None
    kind, folder = init_source(path)
    if kind == "student" and not _student_weights(folder).is_file():
        raise ConfigError(f"train.init: {folder} has no unet/diffusion_pytorch_model.safetensors; start from "
                          f"the run folder instead (its stage/ holds the generator, critic and EMA)")
    for file in _init_files(kind, folder):
        _shapes(file)
    if family is not None:
        _check_family(kind, folder, family)
    if generator_ema is None:
        return kind, folder
    if kind == "student":
        raise ConfigError(f"train.init_ema: {folder} is an exported student (one set of weights, no EMAs); "
                          f"give its run folder, or set train.init_ema to null")
    ema = folder / "ema.safetensors"
    names = set()
    if ema.is_file():
        with safe_open(str(ema), "pt") as f:
            names = {k.split("/", 1)[0] for k in f.keys() if "/" in k}
    if ema_name(generator_ema) not in names:
        raise ConfigError(f"train.init_ema: {folder} has no {ema_name(generator_ema)} (has: {sorted(names) or 'no EMAs'})")
    return kind, folder


def load_stage(path: str | Path, parts: tuple[str, ...] = STAGE_PARTS,
               generator_ema: float | None = None) -> dict[str, dict[str, Tensor]]:
    """The weights `train.init` starts from, by part (of `parts`: generator, and critic and ema
    when the source has them). An exported student's UNet is read as the generator's `unet.`
    weights. With `generator_ema` (train.init_ema), the generator's trained parameters are that
    EMA's averages (its buffers and frozen weights stay the raw generator's)."""
    kind, folder = check_init(path, generator_ema)
    if kind == "student":
        if "generator" not in parts:
            return {}
        return {"generator": {f"unet.{k}": v for k, v in load_file(_student_weights(folder)).items()}}
    out = {part: load_file(folder / f"{part}.safetensors") for part in parts
           if (folder / f"{part}.safetensors").is_file()}
    if generator_ema is not None and "generator" in out:
        prefix = f"{ema_name(generator_ema)}/"
        with safe_open(str(folder / "ema.safetensors"), "pt") as f:  # this decay's tensors only
            averages = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        out["generator"] = {k: averages.get(k, v).to(v.dtype) for k, v in out["generator"].items()}
    return out


def _network_shapes(folder: Path) -> dict[str, list[int]] | None:
    """The weight names and shapes of a diffusers model folder (one safetensors file or a
    sharded index), from the headers; None when it has neither or they cannot be read here."""
    single = folder / "diffusion_pytorch_model.safetensors"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"  # sharded weights
    try:
        if single.is_file():
            return _shapes(single, "model.teacher")[0]
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in _shapes(folder / shard, "model.teacher")[0].items()}
    except (ConfigError, ValueError, KeyError, TypeError, AttributeError):  # the teacher's own checks name it
        return None
    return None


def check_init_fits(path: str | Path | None, teacher: str | Path) -> bool:
    """train.init's generator weights against this run's teacher (a local diffusers folder):
    the generator starts as a copy of the teacher, so every teacher weight must be there, under
    the generator's name, with the teacher's shape, and no other network weight. A ConfigError
    naming train.init, the file and the first differences; checked on the driver before any
    training. False when the teacher's weights cannot be read here (a hub id, not yet trained)."""
    if path is None:
        return True
    teacher_folder = Path(str(teacher)).expanduser()
    if not str(teacher) or not teacher_folder.is_dir():
        return False
    kind, folder = init_source(path)
    file = _init_files(kind, folder)[0] if kind == "student" else folder / "generator.safetensors"
    generator = _shapes(file)[0]
    if kind == "student":  # load_stage reads a student's UNet as the generator's unet.* weights
        generator = {f"unet.{k}": v for k, v in generator.items()}
    checked = False
    for sub in _NETWORK_FOLDERS:
        expected = _network_shapes(teacher_folder / sub)
        if expected is None:
            continue
        checked = True
        prefix = f"{sub}."
        # LoRA layers: the adapter's own weights are new, the wrapped layer's are the teacher's.
        have = {k[len(prefix):].replace(".base_layer.", "."): v for k, v in generator.items()
                if k.startswith(prefix) and "lora_" not in k}
        missing = sorted(set(expected) - set(have))
        extra = sorted(set(have) - set(expected))
        other = sorted(k for k in set(expected) & set(have) if list(expected[k]) != list(have[k]))
        if missing or extra or other:
            problems = []
            if missing:
                problems.append(f"{len(missing)} of the teacher's {sub} weights missing (e.g. {prefix}{missing[0]})")
            if extra:
                problems.append(f"{len(extra)} weights the teacher's {sub} lacks (e.g. {prefix}{extra[0]})")
            if other:
                problems.append(f"{len(other)} of other shapes (e.g. {prefix}{other[0]}: {have[other[0]]} against "
                                f"the teacher's {expected[other[0]]})")
            raise ConfigError(f"train.init: {file} does not fit this run's generator, a copy of the teacher "
                              f"{teacher_folder} ({'; '.join(problems)}); start from a run (or student) of this "
                              f"teacher")
    return checked


class InjectedFailure(RuntimeError):
    """Raised once by rank 0 at DMDSCALE_FAIL_AT_STEP, to rehearse recovery."""


def parse_fail_at_step(value: str | None) -> int | None:
    """DMDSCALE_FAIL_AT_STEP as an int, or a clear error naming the variable."""
    if value is None or value.strip() == "":
        return None
    try:
        step = int(value)
    except ValueError:
        raise ConfigError(f"DMDSCALE_FAIL_AT_STEP must be a non-negative integer step, got {value!r}") from None
    if step < 0:
        raise ConfigError(f"DMDSCALE_FAIL_AT_STEP must be a non-negative integer step, got {value!r}")
    return step


# Keys that may change when a run resumes; any other change means a different run.
RESUMABLE_CHANGES = ("train.max_steps", "train.max_failures", "eval.", "scale.prefetch_batches",
                     "scale.cpu_threads_per_worker", "scale.storage_path", "scale.cluster_cpus", "rollout.",
                     "data.encode_", "scale.resource_wait_s")
# Keys that may change when a trained run only reruns its final evaluation: the resumable ones
# but the length of training (the trained student has the recorded one).
EVALUATION_CHANGES = tuple(k for k in RESUMABLE_CHANGES if k != "train.max_steps")


class RunJournal:
    """A small JSON file next to the run's checkpoints, on the run's storage (local or remote,
    through pyarrow's filesystem): the run's config, one record per time training started, and
    markers such as "this failure was already injected", which must outlive the worker that
    wrote them."""

    def __init__(self, filesystem: Any, directory: str, name: str = "dmdscale_journal.json"):
        self.fs, self.directory = filesystem, directory.rstrip("/")
        self.path = f"{self.directory}/{name}"

    @classmethod
    def at(cls, storage_path: str, run_name: str) -> "RunJournal":
        """The journal of run `run_name` under a storage path or URI (e.g. s3://bucket/runs)."""
        import pyarrow.fs

        from dmdscale.redact import redact

        try:
            fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        except (OSError, pyarrow.ArrowException) as exc:  # a bad URI, an unreachable bucket, no credentials
            raise ConfigError(redact(f"scale.storage_path: cannot use {storage_path} for checkpoints "
                                     f"({str(exc).splitlines()[0]}); fix the URI, the network or the credentials, "
                                     f"or leave it unset to keep them in <out>/ray")) from None
        return cls(fs, f"{root.rstrip('/')}/{run_name}")

    def read(self) -> dict[str, Any]:
        import pyarrow.fs

        if self.fs.get_file_info(self.path).type == pyarrow.fs.FileType.NotFound:
            return {"starts": [], "markers": []}
        with self.fs.open_input_stream(self.path) as f:
            raw = f.read()
        try:
            data = json.loads(raw.decode())
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            raise self._damaged(exc) from None
        if not isinstance(data, dict) or not isinstance(data.get("starts"), list):
            raise self._damaged("not a journal record")
        return data

    def _damaged(self, reason: Any) -> ConfigError:
        # Deleting only the journal is safe: begin() rebuilds it from the config the checkpoints
        # record, and refuses to resume them under another one.
        return ConfigError(f"run journal {self.path} is damaged ({reason}); move it aside (or delete that "
                           f"file only) and rerun the same command: the journal is rebuilt from the config "
                           f"its checkpoints record and the run resumes, checkpoints kept; or use another --out "
                           f"(or scale.storage_path) to start afresh")

    def begin(self, config: dict[str, Any]) -> str:
        """Called by the driver before training; returns what to do with the run folder:

        - "new": train from scratch (a finished run's folder is cleared first; an unfinished
          run of another config that never wrote a checkpoint is replaced, with a note);
        - "resume": resume the unfinished training of the same config;
        - "evaluate": training finished (`mark_trained`) but the final evaluation did not; run
          only the evaluation (evaluation keys may have changed).

        An unfinished run with a checkpoint and another config is an error naming the keys, so
        nothing of it is lost by accident. Without the journal (deleted, moved aside) but with
        checkpoints, the journal is rebuilt from the config the newest of them records
        (`_rebuilt`), and the same rules apply.
        """
        config = json.loads(json.dumps(config, default=str))  # as it reads back (tuples -> lists)
        data = self.read()
        if "config" not in data and not data.get("finished"):
            data = self._rebuilt() or data  # no journal beside checkpoints: theirs is the run's config
        if data.get("finished"):
            self.fs.delete_dir_contents(self.directory)
            data = {"starts": [], "markers": []}
        elif "config" in data:
            may_change = EVALUATION_CHANGES if data.get("trained") else RESUMABLE_CHANGES
            changed = sorted(k for k in set(config) | set(data["config"])
                             if not k.startswith(may_change) and config.get(k) != data["config"].get(k))
            if not changed:
                return "evaluate" if data.get("trained") else "resume" if data["starts"] else "new"
            self._refuse_replacing(changed, data)
            print(f"dmdscale: {self.directory} holds a run of another config ({', '.join(changed)}) that "
                  f"wrote no checkpoint; starting this one in its place")
            data = {"starts": [], "markers": []}
        data["config"] = config
        self._write(data)
        return "new"

    def _rebuilt(self) -> dict[str, Any] | None:
        """The journal rebuilt (and written) from the newest checkpoint's CONFIG_FILE when the
        journal is missing (deleted, moved aside) but checkpoints are there; None without
        checkpoints. Checkpoints that do not record a config (an older dmdscale) are refused:
        resuming them under an unknown config could mix two runs."""
        import pyarrow.fs

        folders = checkpoint_folders(self.fs, self.directory)
        if not folders:
            return None
        for folder in folders:  # newest first; a final checkpoint records it too
            recorded = self._read_json(f"{folder}/{CONFIG_FILE}")
            if isinstance(recorded, dict):
                break
        else:
            raise ConfigError(
                f"{self.directory} holds checkpoints but no run journal ({PurePosixPath(self.path).name}), and "
                f"they do not record the config they were written under (an older dmdscale wrote them); use "
                f"another --out (or scale.storage_path), or delete {self.directory} to train afresh")
        trained = self.fs.get_file_info(f"{folder}/train_metrics.json").type == pyarrow.fs.FileType.File
        print(f"dmdscale: {self.directory} has no run journal; rebuilt it from {PurePosixPath(folder).name}, "
              f"which records the config its run was written under")
        data = {"config": recorded, "starts": [0], "markers": [], "rebuilt_from": PurePosixPath(folder).name,
                **({"trained": True} if trained else {})}
        self._write(data)
        return data

    def _read_json(self, path: str) -> Any:
        """A small JSON file on the storage, or None when it is missing or unreadable."""
        try:
            with self.fs.open_input_stream(path) as f:
                return json.loads(f.read().decode())
        except (OSError, ValueError):  # missing (FileNotFoundError), unreadable, not JSON
            return None

    def resume_point(self) -> str | None:
        """Driver side, before any cluster work: the newest checkpoint a resume will start from,
        verified when the storage is local (remote ones are verified by the workers, which fall
        back the same way). A CorruptCheckpoint naming each bad file when none is good, so the
        run stops here, with nothing of it deleted."""
        import pyarrow.fs

        folders = checkpoint_folders(self.fs, self.directory)
        if not folders:
            return None
        if not isinstance(self.fs, pyarrow.fs.LocalFileSystem):
            return folders[0]
        return load_latest_good((_LocalCheckpoint(f) for f in folders), lambda d: (verify_checkpoint(d), str(d))[1],
                                warn=lambda message: None)  # the workers warn when they fall back

    def _refuse_replacing(self, changed: list[str], data: dict[str, Any]) -> None:
        """An error if the run of another config has anything to lose: a checkpoint (its
        progress) or its training (trained, final evaluation pending)."""
        keys = ", ".join(changed)
        # Its values, so that "the same config" can be given even when the journal was lost.
        recorded = ", ".join(f"{k}={json.dumps(data['config'].get(k))}" for k in changed[:6])
        recorded += ", ..." if len(changed) > 6 else ""
        if data.get("trained"):
            raise ConfigError(
                f"{self.directory} holds a trained run whose final evaluation did not finish, with a "
                f"different config ({keys}); rerun with its config ({recorded}) to evaluate it (evaluation "
                f"keys such as eval.* may change), or use another --out (or scale.storage_path)")
        if _checkpoint_folders(self.fs, self.directory):
            raise ConfigError(
                f"{self.directory} holds an unfinished run with a different config "
                f"({keys}); resume it with the same config ({recorded}), or use another --out "
                f"(or scale.storage_path)")

    def note(self, key: str, value: Any) -> None:
        data = self.read()
        data[key] = value
        self._write(data)

    def mark_trained(self) -> None:
        """Training is done and its student saved; a rerun only evaluates (begin -> "evaluate")."""
        self.note("trained", True)

    def mark_finished(self) -> None:
        self.note("finished", True)

    def _write(self, data: dict[str, Any]) -> None:
        """Write a temp file beside the journal, then rename it over the journal: a crash
        mid-write leaves the old journal whole (an object store's PUT appears whole anyway)."""
        self.fs.create_dir(self.directory, recursive=True)
        temp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open_output_stream(temp) as f:
                f.write(json.dumps(data, indent=1).encode())
            self.fs.move(temp, self.path)
        except BaseException:
            self._delete_quietly(temp)
            raise

    def _delete_quietly(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except OSError:  # never written, or already moved
            pass

    def record_start(self, step: int) -> int:
        """Note that training (re)started at `step`; returns how many starts came before."""
        data = self.read()
        data["starts"].append(step)
        self._write(data)
        return len(data["starts"]) - 1

    def mark_once(self, marker: str) -> bool:
        """True the first time a marker is set for this run, False afterwards."""
        data = self.read()
        if marker in data["markers"]:
            return False
        data["markers"].append(marker)
        self._write(data)
        return True
