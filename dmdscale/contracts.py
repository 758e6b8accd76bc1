"""The contract between a teacher family and the layers that run it.

The commands (driver, sweep, evaluate) resolve the family a config names once
(`dmdscale.families.resolve`) and hand it down; the distributed layer and the evaluators only
call what `Family` declares here. The score-network interface the DMD2 math calls is
`dmdscale.core.networks`; what a family is in full, with the defaults of a family that trains on
Ray, is `dmdscale.families.base.FamilyBase`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

    from dmdscale.config import Config
    from dmdscale.core.networks import Critic, Denoiser


@dataclasses.dataclass
class RunInputs:
    """What a run needs before training: its data paths and its teacher (path or hub id)."""

    train_path: str
    held_out_path: str
    teacher_path: str


@dataclasses.dataclass
class Trained:
    """What training hands to the evaluation and the run folder."""

    student: Any  # the exported student's folder, or (in-process families) the trained model
    metrics: dict[str, Any]  # the training figures (steps, throughput, data rows, ...)
    log: list[dict[str, Any]]  # what was logged, by "step" (losses.png)
    evaluations: list[dict[str, Any]] | None = None  # checkpoint evaluations (fid.png), if any


@dataclasses.dataclass
class Evaluation:
    """The final evaluation: flat figures for metrics.json, and the arrays of samples.npz."""

    metrics: dict[str, Any]
    samples: dict[str, np.ndarray]


class Family(Protocol):
    """A teacher family: everything that differs between teachers, asked by the driver, the
    Ray workers, the evaluators and the sweep."""

    name: str
    run_label: str  # MLflow run names: "<run_label>-<out folder>"
    trains_on_ray: bool  # Ray Train + DeepSpeed; else one plain process (`fit`)
    has_eval_actors: bool  # checkpoints can be evaluated on actors while training
    supports_lora: bool  # lora.enabled trains a LoRA adapter on the generator
    supports_regression_loss: bool  # loss.regression_weight: DMD1's regression term in DMD2Step
    supports_regression_stage: bool  # regression.enabled: a stage on the teacher's ODE pairs
    chooses_export: bool  # export.choose=held_out: the exported weights picked by a held-out figure
    student_parts: Sequence[str]  # what `save_student` writes into the final checkpoint
    pipeline_tag: str  # the Hub's task of the exported student (model card)
    memory_profile: Any  # a dmdscale.tools.memory.MemoryProfile for the memory planner, or None

    # -- driver, before any cluster work
    def check_config(self, cfg: Config) -> None: ...
    def preflight(self, cfg: Config) -> Any: ...
    def prepare(self, cfg: Config, inputs: Any) -> Any: ...
    def metric_names(self, cfg: Config) -> set[str]: ...
    def evaluation_figures(self, cfg: Config) -> set[str]: ...

    # -- the train workers and the actors
    def load_teacher(self, cfg: Config, teacher_path: str) -> Denoiser: ...
    def critic_head(self, cfg: Config, fake_score: Denoiser) -> nn.Module: ...
    def critic(self, cfg: Config, fake_score: Denoiser) -> Critic: ...
    def adapt_generator(self, cfg: Config, generator: Denoiser) -> None: ...
    def save_student(self, cfg: Config, generator: Denoiser, folder: Path) -> None: ...
    def regression_pairs(self, cfg: Config, teacher: Denoiser, device: Any) -> Any: ...

    # -- driver: data, training, evaluation, export
    def train_data(self, cfg: Config, inputs: Any) -> tuple[Any, Any]: ...
    def data_demands(self, cfg: Config) -> list[Any]: ...
    def start_eval_pool(self, cfg: Config, inputs: Any, tracker: Any) -> Any: ...
    def finish_student(self, cfg: Config, out: Path) -> Path: ...
    def choose_export(self, cfg: Config, inputs: Any, trained: Trained) -> Trained: ...
    def fit(self, cfg: Config, inputs: Any, out: Path, tracker: Any, *, fail_at_step: int | None = None,
            on_evaluation: Callable[[dict[str, Any]], None] | None = None, timeline: Any = None) -> Trained: ...
    def usage(self, cfg: Config, call: dict[str, Any]) -> str: ...
    def write_model_card(self, cfg: Config, inputs: Any, trained: Trained, metrics: dict[str, Any]) -> None: ...
    def evaluate(self, cfg: Config, inputs: Any, trained: Trained, workdir: Path) -> Evaluation: ...
    def draw_samples(self, cfg: Config, samples: dict[str, np.ndarray], metrics: dict[str, Any],
                     path: Path) -> None: ...


class CheckpointEvaluator(Protocol):
    """What a family's checkpoint evaluation actors run (`Family.start_eval_pool` launches them on
    `dmdscale.distributed.evalpool.EvaluationPool`): a checkpoint's weights in, the final
    evaluation's figures out (`dmdscale.eval.checkpoints.evaluate_checkpoint`), logged to `sink`."""

    sink: Any  # dmdscale.tracking.MlflowSink: the run's MLflow run (its calls never raise)

    def evaluate(self, step: int, state_dict: dict[str, torch.Tensor],
                 averages: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, Any]: ...


class TextToImage(Family, Protocol):
    """A text-to-image family (`dmdscale.families.text2image.TextToImageFamily`): what the latent
    data stage, the ODE-pair actors and the checkpoint evaluator ask of it."""

    network: str  # the pipeline component the generator trains ("unet", "transformer")

    def prompt_encoder(self, teacher: str, device: Any) -> Any: ...
    def latent_encoder(self, teacher: str, device: Any) -> Callable[[torch.Tensor], torch.Tensor]: ...
    def latent_shape(self, teacher: str, resolution: int) -> tuple[int, int, int]: ...
    def student_pipeline(self, cfg: Config, teacher: str, network: nn.Module | None = None,
                         ) -> tuple[Any, dict[str, Any]]: ...
    def exported_network(self, network: nn.Module) -> nn.Module: ...
