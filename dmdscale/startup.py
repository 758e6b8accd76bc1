"""Where a run's start-up time goes: wall-clock marks measured from the command's own start.

The driver marks its phases (`mark`), the Ray Train worker stamps its own with `time.time()`
(`WORKER_MARKS`: it runs in another process, on the same clock when on the same machine), and
metrics.json reports each as `startup_<phase>_s`, seconds since the command started, so a user
sees where the minutes before the first training step went (bench/fixed_costs.py reads them).
"""
from __future__ import annotations

import time

# In order. Driver: imports and config read (until `run` starts), the checks before any cluster
# work, the Ray cluster, what is built once (a teacher trained here, the classifier), the data
# stream and the evaluation actors. Worker: its process started and entered the training
# function, its players and DeepSpeed engines built (and a checkpoint restored), the first
# batch arrived, the first step finished.
DRIVER_PHASES = ("imports", "preflight", "ray", "prepare", "data")
WORKER_MARKS = ("worker", "engines", "first_batch", "first_step")
PHASES = DRIVER_PHASES + WORKER_MARKS


def command_start() -> float:
    """When this process started (wall clock, seconds since the epoch)."""
    import psutil

    return psutil.Process().create_time()


class Timeline:
    """The driver's marks: `mark(phase)` records now; `figures(worker_marks)` gives metrics.json's
    `startup_<phase>_s` for every phase marked here or stamped by the worker."""

    def __init__(self) -> None:
        self.start = command_start()
        self.marks: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        if phase not in DRIVER_PHASES:
            raise ValueError(f"unknown start-up phase {phase!r}; known: {', '.join(DRIVER_PHASES)}")
        self.marks.setdefault(phase, time.time())  # the first time counts (a resumed fit marks again)

    def figures(self, worker_marks: dict[str, float] | None = None) -> dict[str, float]:
        stamped = {**self.marks, **(worker_marks or {})}
        return {f"startup_{phase}_s": stamped[phase] - self.start for phase in PHASES if phase in stamped}


def figure_names() -> tuple[str, ...]:
    """Every start-up figure a run may report (for `sweep.metric`'s check)."""
    return tuple(f"startup_{phase}_s" for phase in PHASES)
