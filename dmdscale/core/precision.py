"""The one mixed-precision context every forward of a run runs in. Plain torch."""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch


def autocast(device: torch.device, mixed_precision: str) -> ContextManager[object]:
    """bf16 autocast on `device` when `mixed_precision` (train.mixed_precision) is "bf16", else
    a null context (fp32).

    The weights (and optimizer states) stay fp32 and only the forwards' matmuls and convolutions
    run in bf16, as the DMD2 authors train (accelerate's mixed_precision "no" with their own
    autocast): bf16 speed and memory for activations, fp32 updates, so small steps are not
    lost to bf16 rounding. The step, the regression stage, the rollout actors and the ODE-pair
    actors all use this one context, so their numerics agree."""
    if mixed_precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
