"""The single-process training loop: iterate batches, run the DMD2 step, guard non-finite losses."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

from dmdscale.core.step import Batch, NonFiniteLossError

Metrics = dict[str, float]
T = TypeVar("T")
_END = object()


def prefetched(items: Iterable[T], depth: int) -> Iterator[T]:
    """Yield from `items` while a background thread keeps up to `depth` items ready.

    Ray Data prefetches within an epoch but restarts its stream at each epoch boundary; this
    keeps batches flowing across that restart. An error in the source is raised here, in the
    consumer; closing the generator stops the thread.
    """
    if depth <= 0:
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as error:  # handed to the consumer, which re-raises it
            put(error)
            return
        put(_END)

    thread = threading.Thread(target=fill, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def is_nonfinite(metrics: Metrics) -> bool:
    return any(v > 0 for k, v in metrics.items() if k.startswith("nonfinite_"))


@dataclass
class LoopResult:
    history: list[Metrics] = field(default_factory=list)  # every iteration's metrics
    seconds: float = 0.0  # wall time of the loop after the first batch arrived
    data_wait_seconds: float = 0.0  # of which waiting for the next batch
    first_batch_seconds: float = 0.0  # pipeline start-up, kept apart from the steady state

    @property
    def nonfinite_steps(self) -> int:
        """Iterations the step skipped because a loss or gradient was not finite."""
        return sum(is_nonfinite(m) for m in self.history)

    @property
    def data_wait_fraction(self) -> float:
        """Share of steady-state step time spent waiting on data."""
        return self.data_wait_seconds / self.seconds if self.seconds else 0.0


def train_loop(step_fn: Callable[[Batch, int], Metrics], batches: Iterable[Batch], max_steps: int,
               *, start_step: int = 0, max_nonfinite_steps: int = 10, log_every: int = 50,
               on_log: Callable[[Metrics, int], None] | None = None,
               on_step_end: Callable[[Metrics, int], None] | None = None,
               progress: bool = True) -> LoopResult:
    """Run iterations start_step..max_steps-1, timing how long each waits for data.

    `on_log` sees every `log_every`-th iteration's metrics; `on_step_end` every iteration's
    (the distributed layer reports and checkpoints there). A non-finite iteration is skipped
    by the step; more than `max_nonfinite_steps` of them in a row stop the run with
    `NonFiniteLossError` naming the step and the losses.
    """
    result = LoopResult()
    history = result.history
    consecutive = 0
    it = iter(batches)
    bar = tqdm(range(start_step, max_steps), desc="distil", disable=not progress,
               mininterval=1.0, dynamic_ncols=True)
    start = time.perf_counter()
    for step in bar:
        t0 = time.perf_counter()
        batch = next(it)
        if step == start_step:
            result.first_batch_seconds = time.perf_counter() - t0
            start = time.perf_counter()
        else:
            result.data_wait_seconds += time.perf_counter() - t0
        metrics = step_fn(batch, step)
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
        if on_step_end is not None:
            on_step_end(metrics, step)
    result.seconds = time.perf_counter() - start
    return result
