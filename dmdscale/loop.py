"""The single-process training loop: iterate batches, run the DMD2 step, guard non-finite losses."""
from __future__ import annotations

from typing import Callable, Iterable

from tqdm.auto import tqdm

from dmdscale.step import Batch, NonFiniteLossError

Metrics = dict[str, float]


def is_nonfinite(metrics: Metrics) -> bool:
    return any(v > 0 for k, v in metrics.items() if k.startswith("nonfinite_"))


def train_loop(step_fn: Callable[[Batch, int], Metrics], batches: Iterable[Batch], max_steps: int,
               *, start_step: int = 0, max_nonfinite_steps: int = 10, log_every: int = 50,
               on_log: Callable[[Metrics, int], None] | None = None,
               progress: bool = True) -> list[Metrics]:
    """Run iterations start_step..max_steps-1; returns every iteration's metrics.

    A non-finite iteration is skipped by the step; more than `max_nonfinite_steps` of them in
    a row stop the run with `NonFiniteLossError` naming the step and the losses.
    """
    history: list[Metrics] = []
    consecutive = 0
    it = iter(batches)
    bar = tqdm(range(start_step, max_steps), desc="distil", disable=not progress,
               mininterval=1.0, dynamic_ncols=True)
    for step in bar:
        metrics = step_fn(next(it), step)
        history.append(metrics)
        consecutive = consecutive + 1 if is_nonfinite(metrics) else 0
        if consecutive > max_nonfinite_steps:
            losses = {k: v for k, v in metrics.items() if k.startswith("loss_")}
            raise NonFiniteLossError(
                f"{consecutive} consecutive non-finite iterations ending at step {step}: {losses} "
                f"(train.max_nonfinite_steps={max_nonfinite_steps}); lower train.lr or check the teacher"
            )
        if step % log_every == 0 or step == max_steps - 1:
            shown = {k[5:]: f"{v:.3g}" for k, v in metrics.items() if k.startswith("loss_")}
            bar.set_postfix(shown, refresh=False)
            if on_log is not None:
                on_log(metrics, step)
    return history
