"""What the one-iteration benchmarks (sdxl_one_gpu, flux_iteration) share: timing DMD2 iterations
on one batch, and running each set-up in a process of its own, so one's memory cannot leak into
the next (a set-up that runs out of memory becomes a row with its error)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import torch

RESULT = "RESULT "  # the child's line carrying its row as JSON


def time_iterations(step: Any, batch: Any, steps: int) -> tuple[float, float, dict[str, float]]:
    """(median seconds per iteration, first iteration's seconds, the last metrics) over
    `steps` iterations after one warm-up (allocations, offload buffers); non-finite metrics raise."""
    gpu = torch.cuda.is_available()
    seconds, metrics = [], {}
    for i in range(steps + 1):
        t0 = time.perf_counter()
        metrics = step(batch, i)
        if gpu:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
        if not all(torch.isfinite(torch.tensor(v)) for v in metrics.values()):
            raise FloatingPointError(f"non-finite metrics {metrics}")
    timed = sorted(seconds[1:])
    return timed[len(timed) // 2], seconds[0], metrics


def print_row(row: dict[str, Any]) -> None:
    """The child process's answer to `run_isolated`."""
    print(RESULT + json.dumps(row), flush=True)


def run_isolated(script: str, one: str, args: list[str]) -> dict[str, Any]:
    """Run `script --one ONE ARGS...` in a fresh Python process and return the row it printed."""
    proc = subprocess.run([sys.executable, script, "--one", one, *args], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    row = json.loads(lines[-1][len(RESULT):]) if lines else {"setup": one, "error": proc.stderr[-2000:]}
    print(row)
    return row


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU)"
