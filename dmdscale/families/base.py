"""What a teacher family is to dmdscale: one object, asked by the driver, the Ray workers and
the sweep for everything that differs between families.

A family says how to check a config for it, what to verify before any cluster work
(`preflight`) and what to build once before training (`prepare`); on the workers, how to load
its frozen teacher, which discriminator head its critic gets and how the final checkpoint
holds the student; on the driver, the training data stream, the checkpoint evaluation actors,
the exported student, the final evaluation and its pictures. The defaults are those of a
family that trains on Ray Train (`fit`); a family that trains in one process overrides `fit`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from dmdscale.contracts import Evaluation, Family, Trained
from dmdscale.startup import figure_names

if TYPE_CHECKING:
    from torch import nn

    from dmdscale.config import Config
    from dmdscale.core.networks import Critic, Denoiser


def check_teacher_steps(cfg: Config, teacher: str, trained_here: int | None = None) -> None:
    """eval.teacher_steps must fit the teacher's schedule (its length: `trained_here` for a
    teacher dmdscale trains, else a local folder's scheduler config; a hub id is not read)."""
    from dmdscale.config import ConfigError
    from dmdscale.models.hub import is_local

    length = trained_here
    config = Path(teacher).expanduser() / "scheduler" / "scheduler_config.json"
    if length is None and is_local(teacher) and config.is_file():
        length = int(json.loads(config.read_text()).get("num_train_timesteps", 1000))
    if length is not None and cfg.eval.teacher_steps > length:
        raise ConfigError(f"eval.teacher_steps: {cfg.eval.teacher_steps} sampler steps, but the teacher's schedule "
                          f"has {length} timesteps; use at most {length}")


# What a Ray-trained run's metrics.json holds besides its evaluation's figures: the train
# worker's final report, the data's row counts and, with evaluation actors, their counts.
TRAINING_FIGURES = ("steps_completed", "resumed_from_step", "restarts", "train_seconds", "data_wait_fraction",
                    "data_first_batch_seconds", "train_images_per_s", "nonfinite_steps",
                    "teacher_parameters_per_rank", "skipped_rows", "usable_rows")
EVAL_ACTOR_FIGURES = ("checkpoint_evaluations", "eval_dropped_checkpoints")
STARTUP_FIGURES = figure_names()  # when a phase ended, seconds since the command started (dmdscale.startup)
ROLLOUT_FIGURES = tuple(f"rollout_{k}" for k in ("served", "served_local", "dropped_stale", "actors_replaced",
                                                 "mean_staleness", "max_staleness", "version"))


def student_names(cfg: Config) -> list[str]:
    """Whose figures the final evaluation reports for the student: `student` (the exported
    weights) and `student_<name>` for each set of weights evaluated beside it (raw, other EMAs)."""
    from dmdscale.core.ema import ema_name

    others = ["raw"] if cfg.export.ema is not None else []
    others += [ema_name(d) for d in cfg.train.ema_decays if d != cfg.export.ema]
    if cfg.export.choose == "held_out" and cfg.export.ema is not None:  # the one exported may take raw's place
        others.append(ema_name(cfg.export.ema))
    return ["student", *(f"student_{name}" for name in others)]


class FamilyBase(Family):
    """A teacher family (see the module docstring and `dmdscale.contracts.Family`) with the
    defaults of one that trains on Ray; subclasses set the class attributes."""

    name: str = ""
    run_label: str = ""  # MLflow run names: "<run_label>-<out folder>"
    trains_on_ray: bool = True  # Ray Train + DeepSpeed; else one plain process (`fit`)
    has_eval_actors: bool = False  # checkpoints can be evaluated on actors while training
    supports_lora: bool = False  # lora.enabled trains a LoRA adapter on the generator
    # loss.regression_weight > 0: DMD1's regression term on fixed teacher ODE pairs in DMD2Step
    supports_regression_loss: bool = False
    # regression.enabled: a regression stage on the teacher's ODE pairs from prompts (text families)
    supports_regression_stage: bool = False
    chooses_export: bool = False  # export.choose=held_out (`choose_export`)
    student_parts: Sequence[str] = ()  # what `save_student` writes into the final checkpoint
    pipeline_tag: str = ""  # the Hub's task of the exported student (model card)
    memory_profile: Any = None  # its `dmdscale.tools.memory.MemoryProfile` (python -m dmdscale.memory), if any

    # -- config and preflight (driver, before any cluster work) ------------------------
    def check_config(self, cfg: Config) -> None:
        """Raise ValueError naming the key when `cfg` does not fit this family."""

    def preflight(self, cfg: Config) -> Any:
        """Cheap checks of data and teacher; returns the run's inputs as far as they are known."""
        raise NotImplementedError

    def prepare(self, cfg: Config, inputs: Any) -> Any:
        """Build (or load cached) what training needs once (e.g. a teacher trained here).
        A sweep calls it once before its trials, so they all find it cached."""
        return inputs

    def metric_names(self, cfg: Config) -> set[str]:
        """Every number a run of `cfg` may put in metrics.json: what `sweep.metric` can name
        (checked before a sweep starts). Figures that depend on the data (e.g. FID without
        held-out images) are included."""
        from dmdscale.distributed.resources import uses_eval_actors

        names = set(TRAINING_FIGURES) | set(STARTUP_FIGURES) | self.evaluation_figures(cfg)
        if uses_eval_actors(cfg, self):
            names |= set(EVAL_ACTOR_FIGURES)
        if len(cfg.generator.timesteps) > 1:
            names |= set(ROLLOUT_FIGURES)
        return names

    def evaluation_figures(self, cfg: Config) -> set[str]:
        """The numbers `evaluate` reports for `cfg`."""
        raise NotImplementedError

    # -- worker side ---------------------------------------------------------------------
    def load_teacher(self, cfg: Config, teacher_path: str) -> Denoiser:
        raise NotImplementedError

    def critic_head(self, cfg: Config, fake_score: Denoiser) -> nn.Module:
        """The discriminator head on the fake score's bottleneck features (loss.gan_head)."""
        from dmdscale.models.heads import HEADS

        return HEADS[cfg.loss.gan_head].for_model(fake_score)

    def critic(self, cfg: Config, fake_score: Denoiser) -> Critic:
        """The fake score with its discriminator head, told the student's step when
        loss.step_conditioned_critic."""
        from dmdscale.core.networks import Critic

        steps = len(cfg.generator.timesteps) if cfg.loss.step_conditioned_critic else 0
        return Critic(fake_score, self.critic_head(cfg, fake_score), steps)

    def adapt_generator(self, cfg: Config, generator: Denoiser) -> None:
        """Narrow what of the generator trains (e.g. a LoRA adapter); the default trains it all."""

    def save_student(self, cfg: Config, generator: Denoiser, folder: Path) -> None:
        """Write what the final checkpoint carries of the student (`student_parts`)."""
        raise NotImplementedError

    def regression_pairs(self, cfg: Config, teacher: Denoiser, device: Any) -> Any:
        """The (noise, teacher ODE output) pairs of loss.regression_weight (a RegressionPairs),
        or None; only families with `supports_regression_loss` are given a weight."""
        return None

    # -- driver side -----------------------------------------------------------------------
    def train_data(self, cfg: Config, inputs: Any) -> tuple[Any, Any]:
        """(Ray Data stream of training rows, DatasetStats of the source)."""
        raise NotImplementedError

    def data_demands(self, cfg: Config) -> list[Any]:
        """What the family's data stage holds of the cluster before training starts
        (`dmdscale.distributed.cluster.Demand`s); none by default."""
        return []

    def start_eval_pool(self, cfg: Config, inputs: Any, tracker: Any) -> Any:
        """The checkpoint evaluation pool (families with `has_eval_actors`)."""
        raise NotImplementedError

    def finish_student(self, cfg: Config, out: Path) -> Path:
        """Turn what the final checkpoint held of the student into the exported folder."""
        from dmdscale.export import STUDENT_DIR

        return out / STUDENT_DIR

    def choose_export(self, cfg: Config, inputs: Any, trained: Trained) -> Trained:
        """Which of the trained weights are exported (`export.choose`); the default keeps
        `export.ema`'s (families that can choose by a held-out figure override this)."""
        return trained

    def fit(self, cfg: Config, inputs: Any, out: Path, tracker: Any, *, fail_at_step: int | None = None,
            on_evaluation: Callable[[dict[str, Any]], None] | None = None, timeline: Any = None) -> Trained:
        """Train on Ray: the family's data stream, checkpoint evaluations on separate actors
        meanwhile (each handed to `on_evaluation` as soon as it is finished), DMD2 on Ray Train
        with DeepSpeed; then the exported student. With the driver's `timeline`
        (`dmdscale.startup.Timeline`), the start-up figures of the driver and the workers."""
        from dmdscale.distributed.cluster import connect
        from dmdscale.distributed.evalpool import fit_while_watching
        from dmdscale.distributed.launch import fit_on_ray
        from dmdscale.distributed.resources import uses_eval_actors
        from dmdscale.distributed.checkpoint.stages import STAGE_DIR
        from dmdscale.distributed.worker import ALTERNATES_DIR, TRAIN_LOG, WALL_PREFIX

        connect(log_to_driver=True)
        train_data, stats = self.train_data(cfg, inputs)
        eval_pool = self.start_eval_pool(cfg, inputs, tracker) if uses_eval_actors(cfg, self) else None
        if timeline is not None:
            timeline.mark("data")

        def fit() -> dict[str, Any]:
            return fit_on_ray(cfg, self, train_data, inputs.teacher_path, out, tracker,
                              (*self.student_parts, ALTERNATES_DIR, STAGE_DIR, TRAIN_LOG),
                              eval_pool=eval_pool, fail_at_step=fail_at_step)

        evaluations = None
        try:
            if eval_pool is not None:
                metrics, evaluations = fit_while_watching(fit, eval_pool, on_evaluation)
            else:
                metrics = fit()
        finally:
            if eval_pool is not None:
                eval_pool.shutdown()
        worker_marks = {k.removeprefix(WALL_PREFIX): metrics.pop(k) for k in list(metrics) if k.startswith(WALL_PREFIX)}
        if timeline is not None:
            metrics |= timeline.figures(worker_marks)
        metrics |= {"skipped_rows": stats.skipped, "usable_rows": stats.usable}
        if evaluations is not None:
            metrics["checkpoint_evaluations"] = len(evaluations)
            metrics["eval_dropped_checkpoints"] = len(eval_pool.dropped)  # eval.max_queued was full
        return Trained(self.finish_student(cfg, out), metrics, json.loads((out / TRAIN_LOG).read_text()),
                       evaluations)

    def usage(self, cfg: Config, call: dict[str, Any]) -> str:
        """Python that samples the exported student with stock diffusers (for its model card);
        `call` runs the trained timesteps (`export.sampling_call`). `STUDENT` stands for its folder."""
        raise NotImplementedError

    def write_model_card(self, cfg: Config, inputs: Any, trained: Trained, metrics: dict[str, Any]) -> None:
        """README.md in the exported student's folder, once the run's figures are known; the
        teacher is the one the run distilled (for `model.teacher: train`, the folder trained here).
        The card is published: it names the teacher and the student's folder by their own names,
        never by where they lie on this machine, and masks credentials (`export.write_model_card`)."""
        from dmdscale.export import STUDENT_INFO, write_model_card

        folder = Path(trained.student)
        call = json.loads((folder / STUDENT_INFO).read_text())["call"]
        write_model_card(folder, family=self.name, teacher=str(inputs.teacher_path), timesteps=cfg.generator.timesteps,
                         usage=self.usage(cfg, call).replace("STUDENT", folder.name), metrics=metrics,
                         config=cfg.flat(), pipeline_tag=self.pipeline_tag)

    def evaluate(self, cfg: Config, inputs: Any, trained: Trained, workdir: Path) -> Evaluation:
        raise NotImplementedError

    def draw_samples(self, cfg: Config, samples: dict[str, np.ndarray], metrics: dict[str, Any],
                     path: Path) -> None:
        """samples.png: what a person looks at first."""
        raise NotImplementedError
