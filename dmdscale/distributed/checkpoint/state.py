"""What a worker saves to resume training where it stopped, and restores.

A checkpoint folder holds, per trainable module, DeepSpeed's own sharded engine checkpoint
(each rank writes its ZeRO partition of weights and optimizer state; the LR scheduler too), and
per rank its RNG states (safetensors) and data position (JSON). Everything is read back without
unpickling arbitrary objects: safetensors, JSON, and DeepSpeed files through `torch.load`
with `weights_only=True` (`dmdscale.distributed.engine.load_weights_only`).

Each rank's save ends with its checksums, and a load verifies the whole checkpoint first
(`dmdscale.distributed.checkpoint.integrity`). Rank 0 also writes the run's config
(CONFIG_FILE): a run folder whose journal is lost is resumed only under the config its
checkpoints were written under.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from dmdscale.distributed.checkpoint.integrity import (
    _FORMAT_KEY,
    CHECKPOINT_FORMAT,
    CheckpointMismatch,
    verify_checkpoint,
    write_checksums,
)


def _state_file(rank: int) -> str:
    return f"training_state_rank{rank}.json"


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


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


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


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
