"""unet2d's checkpoint evaluator (`dmdscale.contracts.CheckpointEvaluator`): what each evaluation
actor runs while training goes on (usable in-process): `eval.num_samples` student samples with
the final evaluation's labels and seed, FID and KID against the held-out images with the final
evaluation's extractor, class accuracy when that extractor is the digit classifier, the
label-free sample quality figures, and a 10-per-class sample grid."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dmdscale.core import seeds


def eval_spec(cfg: Any) -> dict[str, Any]:
    """What the final evaluation (`UNet2DFamily.evaluate`) samples the student with: the same
    labels, image shape, noise seed and timesteps, so a checkpoint's FID is comparable."""
    n, c, r = cfg.eval.num_samples, cfg.data.channels, cfg.data.resolution
    return {"labels": np.arange(n) % cfg.data.num_classes, "shape": (c, r, r),
            "seed": seeds.evaluation_noise(cfg.train.seed), "timesteps": list(cfg.generator.timesteps),
            "num_classes": cfg.data.num_classes}


class CheckpointEvaluator:
    """Evaluates student weights and logs the figures.

    `build_generator()` returns the student architecture (e.g. the teacher loaded with
    `load_unet`), built once; each evaluation loads a full state_dict into it.
    """

    def __init__(self, build_generator: Callable[[], nn.Module], spec: dict[str, Any],
                 real_images: np.ndarray, extractor: str | nn.Module, tracking_uri: str | None,
                 run_id: str | None, device: torch.device | str = "cpu"):
        from dmdscale.tracking import MlflowSink

        self.device = torch.device(device)
        self.model = build_generator().to(self.device).eval().requires_grad_(False)
        self.spec = spec
        self.real = np.array(real_images, copy=True)  # owned here, not a view into the object store
        self.extractor = extractor
        self.sink = MlflowSink(tracking_uri, run_id)  # its calls never raise

    def evaluate(self, step: int, state_dict: dict[str, torch.Tensor],
                 averages: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
        """{step, fid_student, kid_student, class_accuracy_student (None without a classifier),
        the sample quality figures of `sample_quality_of` (`swd_pixels_student`,
        `recall_classifier_student`, ...), seconds}; `*_student_<name>` for each of `averages`
        (e.g. {"ema_0.97": weights}); `error` / `tracking_error` as `evaluate_checkpoint` says."""
        from dmdscale.eval.checkpoints import evaluate_checkpoint
        from dmdscale.eval.plots import first_per_class, save_grid

        labels = self.spec["labels"]
        shown = first_per_class(labels, 10)

        def grid(images: np.ndarray, result: dict[str, Any]) -> Callable[[Path], Path]:
            return lambda path: save_grid(images[shown], labels[shown], path,
                                          title=f"step {step}: FID {result['fid_student']:.2f}")

        return evaluate_checkpoint(self.sink, step, ("fid", "kid", "class_accuracy"),
                                   lambda who, weights, result: self._figures(who, weights, step, result),
                                   state_dict, averages, grid)

    def _figures(self, who: str, state_dict: dict[str, torch.Tensor], step: int, result: dict[str, Any]) -> np.ndarray:
        """Sample `state_dict`'s student and add `who`'s figures to `result`; its images."""
        from dmdscale.eval.metrics import (
            DigitClassifier,
            class_accuracy,
            compute_fid_kid,
            sample_quality_of,
            sample_student,
        )

        self.model.load_state_dict(state_dict)
        spec = self.spec
        images = sample_student(self.model, spec["timesteps"], spec["labels"], spec["shape"],
                                spec["seed"], self.device, desc=f"evaluate step {step}: {who}")
        result[f"fid_{who}"], result[f"kid_{who}"] = compute_fid_kid(images, self.real, self.extractor)
        classifier = self.extractor if isinstance(self.extractor, DigitClassifier) else None
        if classifier is not None:
            result[f"class_accuracy_{who}"] = class_accuracy(classifier, images, spec["labels"])
        result |= sample_quality_of(who, self.real, images, classifier, spec["seed"])
        return images
