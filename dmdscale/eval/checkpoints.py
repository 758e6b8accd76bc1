"""What every family's checkpoint evaluator shares (the contract `dmdscale.contracts.CheckpointEvaluator`).

An evaluator samples a checkpoint's student, computes the final evaluation's figures under the
same names (`fid_student`, ...; `*_student_<name>` for averaged weights such as `ema_0.97`),
and logs them and a sample grid to the run's MLflow run at the checkpoint's step
(`evaluate_checkpoint`). A failing evaluation is a result with an `error`, a failing log a
`tracking_error`; neither raises, so the actor that runs it goes on with the next checkpoint.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

GRID_ARTIFACT_DIR = "eval_grids"


def warn(message: str) -> None:
    # print, not warnings.warn: the default filter would show a repeated failure only once.
    print(f"warning: {message}", file=sys.stderr, flush=True)


def evaluate_checkpoint(sink: Any, step: int, figures: Sequence[str],
                        measure: Callable[[str, dict[str, torch.Tensor], dict[str, Any]], np.ndarray],
                        state_dict: dict[str, torch.Tensor], averages: dict[str, dict[str, torch.Tensor]] | None,
                        grid: Callable[[np.ndarray, dict[str, Any]], Callable[[Path], Path]]) -> dict[str, Any]:
    """{step, `<figure>_student` for each of `figures` (None until measured), seconds}:
    `measure(who, weights, result)` samples `weights` and adds `who`'s figures to `result`,
    returning the images, for the student and each of `averages` ("student_<name>"); then the
    figures and `grid(student images, result)`'s picture are logged at `step`."""
    t0 = time.perf_counter()
    result: dict[str, Any] = {"step": int(step)} | {f"{name}_student": None for name in figures}
    try:
        images = measure("student", state_dict, result)
        for name, weights in (averages or {}).items():
            measure(f"student_{name}", weights, result)
    except Exception as exc:  # reported in the result; the actor goes on with the next one
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["seconds"] = time.perf_counter() - t0
        warn(f"evaluation of the checkpoint at step {step} failed: {result['error']}")
        return result
    problems = log_evaluation(sink, int(step), result, grid(images, result))
    if problems:
        result["tracking_error"] = "; ".join(problems)
    result["seconds"] = time.perf_counter() - t0
    return result


def log_evaluation(sink: Any, step: int, result: dict[str, Any], draw_grid: Callable[[Path], Path]) -> list[str]:
    """A checkpoint evaluation's figures at `step` and its sample grid (`draw_grid(path)`) into the
    MLflow run; failures are returned, never raised (the sink prints one warning per outage)."""
    if not sink.enabled:
        return []
    problems = []
    numbers = {k: v for k, v in result.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if not sink.log_metrics(numbers, step, what=f"metrics of the evaluation at step {step}"):
        problems.append(f"metrics: {sink.last_problem}")
    with tempfile.TemporaryDirectory(prefix="dmdscale-grid-") as tmp:
        try:
            path = draw_grid(Path(tmp) / f"step_{step:07d}.png")
        except Exception as exc:
            problems.append(f"grid: {type(exc).__name__}: {exc}")
            warn(f"sample grid of the evaluation at step {step} failed: {exc}")
        else:
            if not sink.log_artifact(path, GRID_ARTIFACT_DIR):
                problems.append(f"grid: {sink.last_problem}")
    return problems
