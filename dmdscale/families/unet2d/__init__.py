"""unet2d: a class-conditional pixel-space diffusers `UNet2DModel` teacher (the digits demo).

The teacher is a user's diffusers folder (`model.teacher`) or one dmdscale trains on the train
split and caches (`model.teacher: train`). Data: labelled images (Parquet or image folder;
"digits" builds scikit-learn's). Evaluation: FID against held-out real images (clean-fid, on
a digit classifier's features or local Inception weights) and class accuracy, for the teacher
at its many-step sampler and at 1 step and for the student; checkpoints are evaluated on Ray
actors while training goes on.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmdscale.config import Config
from dmdscale.contracts import Evaluation, RunInputs, Trained
from dmdscale.families.base import FamilyBase, check_teacher_steps, student_names




@dataclasses.dataclass
class Inputs(RunInputs):
    """What a digits run needs before training: data, the FID classifier, the teacher."""

    train: tuple[np.ndarray, np.ndarray] | None = None  # (uint8 NHWC images, labels)
    held_out: tuple[np.ndarray, np.ndarray] | None = None
    classifier: Any = None


def resolve_teacher(cfg: Config, images: np.ndarray, labels: np.ndarray) -> Path:
    """The teacher's diffusers folder: the user's, or one trained here on the train split
    (cached by its config and data, so later runs load it with from_pretrained at once)."""
    from dmdscale.families.unet2d.model import tiny_unet_config
    from dmdscale.families.unet2d.teacher import load_or_train_teacher

    if cfg.model.teacher != "train":
        return Path(cfg.model.teacher)
    tt = cfg.teacher_training
    return load_or_train_teacher(
        Path(cfg.cache_dir).expanduser() / "teachers", images, labels,
        tiny_unet_config(cfg.data.resolution, cfg.data.channels, cfg.data.num_classes, tt.width),
        steps=tt.steps, batch_size=tt.batch_size, lr=tt.lr, prediction_type=tt.prediction_type,
        seed=cfg.train.seed)


def check_teacher_shape(cfg: Config) -> None:
    """A local teacher folder's UNet takes data.resolution x data.channels images (a hub id is
    not read here): a mismatch fails at preflight, not after the classifier has trained."""
    from dmdscale.config import ConfigError
    from dmdscale.models.hub import is_local

    config = Path(cfg.model.teacher).expanduser() / "unet" / "config.json"
    if not (is_local(cfg.model.teacher) and config.is_file()):
        return
    unet = json.loads(config.read_text())
    size, channels = unet.get("sample_size"), unet.get("in_channels")
    if isinstance(size, int) and size != cfg.data.resolution:
        raise ConfigError(f"data.resolution: the teacher {config} takes {size}x{size} images, got "
                          f"data.resolution={cfg.data.resolution}; set data.resolution={size}")
    if isinstance(channels, int) and channels != cfg.data.channels:
        raise ConfigError(f"data.channels: the teacher {config} takes {channels}-channel images, got "
                          f"data.channels={cfg.data.channels}; set data.channels={channels}")


def fid_extractor(cfg: Config, classifier: Any) -> Any:
    """FID features: the digit classifier, or clean-fid's Inception (local weights)."""
    return classifier if cfg.eval.feature_extractor == "classifier" else "inception"


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


class UNet2DFamily(FamilyBase):
    name = "unet2d"
    run_label = "digits"
    has_eval_actors = True
    supports_regression_loss = True
    chooses_export = True
    pipeline_tag = "unconditional-image-generation"  # class-conditional: the Hub has no closer task

    @property
    def student_parts(self) -> tuple[str, ...]:
        from dmdscale.export import STUDENT_DIR

        return (STUDENT_DIR,)

    def check_config(self, cfg: Config) -> None:
        if cfg.eval.feature_extractor == "clip":
            raise ValueError("eval.feature_extractor: 'clip' is for the text-to-image families; "
                             "unet2d takes 'classifier' or 'inception'")
        if cfg.loss.gan_feature_depths:
            raise ValueError("loss.gan_feature_depths: transformer teachers only; the unet2d discriminator reads the "
                             "UNet's mid block (leave it empty, choose the head with loss.gan_head)")
        if cfg.model.teacher == "train" and cfg.data.resolution % 4:
            # The teacher trained here downsamples twice (tiny_unet_config).
            raise ValueError(f"data.resolution: the teacher dmdscale trains (model.teacher: train) halves the "
                             f"resolution twice, so it must be a multiple of 4 (got {cfg.data.resolution})")

    def preflight(self, cfg: Config) -> Inputs:
        """(train path, held-out path), validated on the driver before any cluster work."""
        from dmdscale.data.sources import check_source, source_paths
        from dmdscale.models.hub import check_hub_teacher
        from dmdscale.families.unet2d.model import check_unet_folder
        from dmdscale.families.unet2d.teacher import TRAIN_TIMESTEPS

        train, held_out = source_paths(cfg)
        for path in {train, held_out}:  # class-conditional: labels are required, each with its class
            check_source(path, require_labels=True, num_classes=cfg.data.num_classes)
        if cfg.model.teacher != "train":
            check_hub_teacher(check_unet_folder(cfg.model.teacher))
            check_teacher_shape(cfg)
        check_teacher_steps(cfg, cfg.model.teacher, TRAIN_TIMESTEPS if cfg.model.teacher == "train" else None)
        return Inputs(train, held_out, cfg.model.teacher)

    def prepare(self, cfg: Config, inputs: Inputs) -> Inputs:
        """Load the data; train or load (cached under cache_dir) the classifier and the teacher."""
        from dmdscale.data.sources import DataError, load_arrays
        from dmdscale.eval.metrics import load_or_train_classifier

        res, ch = cfg.data.resolution, cfg.data.channels
        train = load_arrays(inputs.train_path, res, ch, require_labels=True)[:2]
        held_out = load_arrays(inputs.held_out_path, res, ch, require_labels=True)[:2]
        if len(train[0]) == 0 or len(held_out[0]) == 0:
            raise DataError(f"no usable images in {inputs.train_path if len(train[0]) == 0 else inputs.held_out_path}")
        classifier = load_or_train_classifier(Path(cfg.cache_dir).expanduser() / "classifiers", *train,
                                              steps=cfg.eval.classifier_steps, num_classes=cfg.data.num_classes)
        teacher = str(resolve_teacher(cfg, *train))
        return dataclasses.replace(inputs, teacher_path=teacher, train=train, held_out=held_out, classifier=classifier)

    def load_teacher(self, cfg: Config, teacher_path: str):
        from dmdscale.families.unet2d.model import load_unet

        return load_unet(teacher_path)

    def regression_pairs(self, cfg: Config, teacher, device):
        from dmdscale.core.step import RegressionPairs

        c, r = cfg.data.channels, cfg.data.resolution
        return RegressionPairs.for_config(cfg, teacher, (c, r, r), cfg.data.num_classes, device)

    def save_student(self, cfg: Config, generator, folder: Path) -> None:
        from dmdscale.export import STUDENT_DIR
        from dmdscale.families.unet2d.export import export_unet_student

        export_unet_student(generator, cfg.generator.timesteps, folder / STUDENT_DIR, self.name,
                            cfg.export.fp16_variant)

    def usage(self, cfg: Config, call: dict[str, Any]) -> str:
        c, r = cfg.data.channels, cfg.data.resolution
        return f"""import torch
from diffusers import LCMScheduler, UNet2DModel

unet = UNet2DModel.from_pretrained("STUDENT", subfolder="unet")
scheduler = LCMScheduler.from_pretrained("STUDENT", subfolder="scheduler")
scheduler.set_timesteps({", ".join(f"{k}={v}" for k, v in call.items())})
labels = torch.arange({cfg.data.num_classes})  # the class of each sample
x = torch.randn(len(labels), {c}, {r}, {r})
with torch.no_grad():
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x).prev_sample
images = ((x.clamp(-1, 1) + 1) * 127.5).round().byte()  # N x {c} x {r} x {r}"""

    def train_data(self, cfg: Config, inputs: Inputs) -> tuple[Any, Any]:
        from dmdscale.data.sources import kept_decoded, read_dataset

        res, ch = cfg.data.resolution, cfg.data.channels
        data = read_dataset(inputs.train_path, res, ch, require_labels=True, num_cpus=min(1.0, cfg.scale.data_cpus))
        return kept_decoded(data, inputs.train_path, res, ch, cfg.data.materialize, require_labels=True)

    def start_eval_pool(self, cfg: Config, inputs: Inputs, tracker: Any) -> Any:
        """Checkpoint evaluation actors (`evaluator.CheckpointEvaluator`) on the final evaluation's
        spec, held-out images and FID features."""
        from dmdscale.distributed.evalpool import EvaluationPool
        from dmdscale.families.unet2d.evaluator import CheckpointEvaluator, eval_spec
        from dmdscale.families.unet2d.model import load_unet

        return EvaluationPool.launch(cfg, CheckpointEvaluator, functools.partial(load_unet, inputs.teacher_path),
                                     eval_spec(cfg), np.ascontiguousarray(inputs.held_out[0]),
                                     fid_extractor(cfg, inputs.classifier), tracker.tracking_uri, tracker.run_id)

    def choose_export(self, cfg: Config, inputs: Inputs, trained: Trained) -> Trained:
        """export.choose=held_out: the exported student becomes whichever of it and the weights
        beside it (raw, other EMAs) has the lowest FID against the held-out images, on
        export.choose_samples samples from noise of their own (so the final evaluation's draw does
        not pick its own winner); the one exported before takes the winner's place under
        alternates/. `student_weights` names the winner, `export_choice_fid` every candidate's FID."""
        if cfg.export.choose != "held_out":
            return trained
        from dmdscale.core import seeds
        from dmdscale.core.ema import ema_name
        from dmdscale.distributed.worker import ALTERNATES_DIR
        from dmdscale.eval.metrics import compute_fid_kid, sample_student
        from dmdscale.export import STUDENT_DIR
        from dmdscale.families.unet2d.model import load_unet

        student = Path(trained.student)
        alternates = student.parent / ALTERNATES_DIR
        exported = "raw" if cfg.export.ema is None else ema_name(cfg.export.ema)
        candidates = {exported: student} | {f.parent.name: f for f in sorted(alternates.glob(f"*/{STUDENT_DIR}"))}
        n, (c, r) = cfg.export.choose_samples, (cfg.data.channels, cfg.data.resolution)
        labels, seed = np.arange(n) % cfg.data.num_classes, seeds.export_choice(cfg.train.seed)
        extractor = fid_extractor(cfg, inputs.classifier)
        fids = {name: compute_fid_kid(sample_student(load_unet(folder), cfg.generator.timesteps, labels, (c, r, r), seed,
                                                     desc=f"export.choose: {name}"), inputs.held_out[0], extractor)[0]
                for name, folder in candidates.items()}
        best = min(fids, key=fids.get)
        if best != exported:  # swap the folders: the winner is what student/ holds
            parked = student.parent / f".{STUDENT_DIR}-{exported}"
            student.rename(parked)
            candidates[best].rename(student)
            candidates[best].parent.rmdir()
            (alternates / exported).mkdir(parents=True, exist_ok=True)
            parked.rename(alternates / exported / STUDENT_DIR)
        print(f"dmdscale: export.choose: {best} exported (held-out FID over {n} samples: "
              + ", ".join(f"{k} {v:.2f}" for k, v in fids.items()) + ")", flush=True)
        return dataclasses.replace(trained, metrics=trained.metrics | {"student_weights": best,
                                                                       "export_choice_fid": fids})

    def evaluation_figures(self, cfg: Config) -> set[str]:
        from dmdscale.eval.metrics import sample_quality_names

        space = "classifier" if cfg.eval.feature_extractor == "classifier" else None
        quality = sample_quality_names(cfg.data.resolution, cfg.data.channels, space)
        names = {"teacher_steps", "student_steps", "sampling_speedup", "classifier_accuracy_held_out"}
        for who in [*student_names(cfg), "teacher", "teacher_1step", "real_train"]:
            names |= {f"fid_{who}", f"kid_{who}"} | {f"{q}_{who}" for q in quality}
            names |= set() if who == "real_train" else {f"class_accuracy_{who}"}
        return names

    def evaluate(self, cfg: Config, inputs: Inputs, trained: Trained, workdir: Path) -> Evaluation:
        """FID and KID against held-out real images and class accuracy, for the teacher at its
        many-step sampler and at 1 step, and for the student at its steps (and the weights not
        exported, e.g. `fid_student_raw` next to an exported EMA); plus the measured speedup."""
        from dmdscale.core.ema import ema_name
        from dmdscale.core.sampling import TEACHER_SAMPLER, sample, teacher_sample
        from dmdscale.families.unet2d.evaluator import eval_spec
        from dmdscale.distributed.worker import ALTERNATES_DIR
        from dmdscale.eval.metrics import (
            DigitClassifier,
            class_accuracy,
            compute_fid_kid,
            generate,
            sample_quality_of,
            sample_student,
        )
        from dmdscale.eval.cache import cached_arrays, cached_figures, folder_fingerprint, module_fingerprint
        from dmdscale.export import STUDENT_DIR
        from dmdscale.families.unet2d.model import load_unet

        teacher, student = load_unet(inputs.teacher_path), load_unet(trained.student)
        # The weights not exported (raw or other EMAs), evaluated next to the student.
        alternates = sorted((Path(trained.student).parent / ALTERNATES_DIR).glob(f"*/{STUDENT_DIR}"))
        classifier, (real, real_labels) = inputs.classifier, inputs.held_out
        spec = eval_spec(cfg)  # the checkpoint evaluations sample with the same spec
        n, (c, r, _), labels = cfg.eval.num_samples, spec["shape"], spec["labels"]
        gs, steps = cfg.loss.guidance_scale, cfg.generator.timesteps

        def teacher_many(z, y):
            return teacher_sample(teacher, z, cfg.eval.teacher_steps, y, gs)

        def teacher_one(z, y):
            return teacher_sample(teacher, z, 1, y, gs)

        def student_fn(z, y):
            return sample(student, student.schedule, z, steps, y)

        extractor = fid_extractor(cfg, classifier)

        def teacher_images() -> dict[str, np.ndarray]:
            return {name: generate(fn, labels, spec["shape"], spec["seed"], desc=f"evaluate: {name}")
                    for name, fn in [("teacher", teacher_many), ("teacher_1step", teacher_one)]}

        # The teacher's samples do not depend on the student: a rerun with the same teacher (its
        # weights' hash), sampler, steps, guidance, labels, shape and seed reads them back.
        local = Path(inputs.teacher_path).is_dir()
        key = {"teacher": folder_fingerprint(inputs.teacher_path) if local else None,
               "sampler": TEACHER_SAMPLER, "teacher_steps": cfg.eval.teacher_steps, "guidance_scale": gs,
               "labels": labels, "shape": list(spec["shape"]), "seed": spec["seed"]}
        images, cached = cached_arrays(Path(cfg.cache_dir) / "teacher_samples" if local else None, key,
                                       teacher_images)
        if cached:
            print(f"dmdscale: evaluate: the teacher's {len(labels)} samples come from the cache "
                  f"({Path(cfg.cache_dir) / 'teacher_samples'})", flush=True)
        images["student"] = sample_student(student, steps, labels, spec["shape"], spec["seed"],
                                           desc="evaluate: student")
        for folder in alternates:
            images[f"student_{folder.parent.name}"] = sample_student(
                load_unet(folder), steps, labels, spec["shape"], spec["seed"], desc=f"evaluate: {folder.parent.name}")
        metrics: dict[str, Any] = {"teacher_steps": cfg.eval.teacher_steps, "student_steps": len(steps),
                                   "fid_feature_space": cfg.eval.feature_extractor,
                                   "student_weights": "raw" if cfg.export.ema is None else ema_name(cfg.export.ema)}
        # The sample quality figures in the checkpoint evaluations' feature spaces (pixels, and the
        # classifier when it is the FID's extractor), so the curves end where these figures are.
        space = extractor if isinstance(extractor, DigitClassifier) else None
        # The floor of these figures: as many real training images as samples (all of them when the
        # training set is smaller; FID's bias then makes the floor slightly high), against the same held-out set.
        floor = inputs.train[0][:n]

        def figures(name: str, imgs: np.ndarray, generated_for: np.ndarray | None = labels) -> dict[str, float]:
            fid, kid = compute_fid_kid(imgs, real, extractor)
            accuracy = {} if generated_for is None else {
                f"class_accuracy_{name}": class_accuracy(classifier, imgs, generated_for)}
            return {f"fid_{name}": fid, f"kid_{name}": kid, **accuracy,
                    **sample_quality_of(name, real, imgs, space, spec["seed"])}

        def reference_figures() -> dict[str, float]:  # the teacher's and the real floor's: no student in them
            return {**figures("teacher", images["teacher"]), **figures("teacher_1step", images["teacher_1step"]),
                    **figures("real_train", floor, generated_for=None)}

        # Measured once per teacher samples, held-out and floor images and feature extractor.
        reference_key = {**key, "held_out": real, "floor": floor, "extractor": module_fingerprint(extractor),
                         "classifier": module_fingerprint(classifier)}
        reference, figures_cached = cached_figures(Path(cfg.cache_dir) / "teacher_figures" if local else None,
                                                   reference_key, reference_figures)
        if figures_cached:
            print("dmdscale: evaluate: the teacher's and the real floor's figures come from the cache "
                  f"({Path(cfg.cache_dir) / 'teacher_figures'})", flush=True)
        metrics |= reference
        for name, imgs in images.items():
            if not name.startswith("teacher"):
                metrics |= figures(name, imgs)
        # Speed: the same batch through both samplers (after a warm-up call each).
        z = torch.randn(min(n, 256), c, r, r)
        y = torch.from_numpy(labels[: len(z)]).long()
        for fn in (teacher_many, student_fn):
            fn(z[:2], y[:2])
        metrics["sampling_speedup"] = _timed(teacher_many, z, y) / _timed(student_fn, z, y)
        metrics["classifier_accuracy_held_out"] = class_accuracy(classifier, real, real_labels)
        return Evaluation(metrics, {"images": images["student"], "labels": labels.astype(np.int64)})

    def draw_samples(self, cfg: Config, samples: dict[str, np.ndarray], metrics: dict[str, Any],
                     path: Path) -> None:
        from dmdscale.eval.plots import first_per_class, save_grid

        images, labels = samples["images"], samples["labels"]
        shown = first_per_class(labels, 10)
        save_grid(images[shown], labels[shown], path,
                  title=f"{len(cfg.generator.timesteps)}-step student: FID {metrics['fid_student']:.2f}, "
                        f"SWD {metrics['swd_pixels_student']:.0f} (teacher {cfg.eval.teacher_steps} steps: "
                        f"{metrics['fid_teacher']:.2f}, {metrics['swd_pixels_teacher']:.0f})")
