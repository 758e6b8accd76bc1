"""What a worker saves to resume training where it stopped, and the run's attempt journal.

A checkpoint folder holds, per trainable module, DeepSpeed's own sharded engine checkpoint
(each rank writes its ZeRO partition of weights and optimizer state; the LR scheduler too), and
per rank its RNG states (safetensors) and data position (JSON). Everything is read back without
unpickling arbitrary objects: safetensors, JSON, and DeepSpeed files through `torch.load`
with `weights_only=True` (`dmdscale.distributed.engine.load_weights_only`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from dmdscale.config import ConfigError


def _state_file(rank: int) -> str:
    return f"training_state_rank{rank}.json"


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
                        rngs: dict[str, Tensor], rank: int) -> None:
    """Every rank calls this (engine saves are collective) into its own local folder."""
    directory = Path(directory)
    for tag, module in modules.items():
        module.save(directory, tag)
    save_file({k: v.contiguous() for k, v in rngs.items()}, directory / f"rng_rank{rank}.safetensors")
    (directory / _state_file(rank)).write_text(json.dumps(asdict(state)))


def load_training_state(directory: str | Path, modules: dict[str, Checkpointable],
                        rank: int) -> tuple[TrainingState, dict[str, Tensor]]:
    """Restore the modules in place; return this rank's state and RNG states."""
    directory = Path(directory)
    state_file = directory / _state_file(rank)
    if not state_file.is_file() and (directory / "train_metrics.json").is_file():
        raise FileNotFoundError(
            f"checkpoint {directory} is the final one of a finished run (it holds the exported "
            f"student, not training state); delete the run's folder or use another --out")
    if not state_file.is_file():
        raise FileNotFoundError(
            f"checkpoint {directory} has no {state_file.name}: it was written by fewer workers "
            f"than this run has (resuming needs the same scale.num_workers)")
    for tag, module in modules.items():
        module.load(directory, tag)
    state = TrainingState(**json.loads(state_file.read_text()))
    return state, load_file(directory / f"rng_rank{rank}.safetensors")


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


def save_stage(folder: str | Path, weights: dict[str, dict[str, Tensor] | None]) -> Path:
    """folder/stage/<part>.safetensors for the parts given (generator: the raw trained weights;
    critic: fake score + head; ema: the averages): a later run's `train.init`."""
    stage = Path(folder) / STAGE_DIR
    stage.mkdir(parents=True, exist_ok=True)
    for part, state in weights.items():
        if state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, stage / f"{part}.safetensors")
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


def load_stage(path: str | Path, parts: tuple[str, ...] = STAGE_PARTS) -> dict[str, dict[str, Tensor]]:
    """The weights `train.init` starts from, by part (of `parts`: generator, and critic and ema
    when the source has them). An exported student's UNet is read as the generator's `unet.`
    weights."""
    kind, folder = init_source(path)
    if kind == "student":
        if "generator" not in parts:
            return {}
        unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
        if not unet.is_file():
            raise ConfigError(f"train.init: {folder} has no unet/diffusion_pytorch_model.safetensors; start from "
                              f"the run folder instead (its stage/ holds the generator, critic and EMA)")
        return {"generator": {f"unet.{k}": v for k, v in load_file(unet).items()}}
    return {part: load_file(folder / f"{part}.safetensors") for part in parts
            if (folder / f"{part}.safetensors").is_file()}


class InjectedFailure(RuntimeError):
    """Raised once by rank 0 at DMDSCALE_FAIL_AT_STEP, to rehearse recovery."""


def parse_fail_at_step(value: str | None) -> int | None:
    """DMDSCALE_FAIL_AT_STEP as an int, or a clear error naming the variable."""
    if value is None or value.strip() == "":
        return None
    try:
        step = int(value)
    except ValueError:
        raise ValueError(f"DMDSCALE_FAIL_AT_STEP must be a non-negative integer step, got {value!r}") from None
    if step < 0:
        raise ValueError(f"DMDSCALE_FAIL_AT_STEP must be a non-negative integer step, got {value!r}")
    return step


# Keys that may change when a run resumes; any other change means a different run.
RESUMABLE_CHANGES = ("train.max_steps", "train.max_failures", "eval.", "scale.prefetch_batches",
                     "scale.cpu_threads_per_worker", "scale.storage_path", "scale.cluster_cpus", "rollout.",
                     "data.encode_")


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

        fs, root = pyarrow.fs.FileSystem.from_uri(storage_path)
        return cls(fs, f"{root.rstrip('/')}/{run_name}")

    def read(self) -> dict[str, Any]:
        import pyarrow.fs

        if self.fs.get_file_info(self.path).type == pyarrow.fs.FileType.NotFound:
            return {"starts": [], "markers": []}
        with self.fs.open_input_stream(self.path) as f:
            return json.loads(f.read().decode())

    def begin(self, config: dict[str, Any]) -> str:
        """Called by the driver before training: "new", or "resume" an unfinished run of the
        same config. A finished run's folder is cleared for a fresh one; an unfinished run with
        another config is an error naming the keys, so nothing of it is lost by accident."""
        config = json.loads(json.dumps(config, default=str))  # as it reads back (tuples -> lists)
        data = self.read()
        if data.get("finished"):
            self.fs.delete_dir_contents(self.directory)
            data = {"starts": [], "markers": []}
        elif "config" in data:
            changed = sorted(k for k in set(config) | set(data["config"])
                             if not k.startswith(RESUMABLE_CHANGES) and config.get(k) != data["config"].get(k))
            if changed:
                raise ConfigError(
                    f"{self.directory} holds an unfinished run with a different config "
                    f"({', '.join(changed)}); resume it with the same config, or use another --out "
                    f"(or scale.storage_path)")
            return "resume" if data["starts"] else "new"
        data["config"] = config
        self._write(data)
        return "new"

    def note(self, key: str, value: Any) -> None:
        data = self.read()
        data[key] = value
        self._write(data)

    def mark_finished(self) -> None:
        self.note("finished", True)

    def _write(self, data: dict[str, Any]) -> None:
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps(data, indent=1).encode())

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
