"""dmdscale: DMD2 distillation of diffusion models into few-step students, with Ray + DeepSpeed.

`import dmdscale` stays cheap (no torch or diffusers). It exposes `DMD2Scheduler` lazily because
exported student pipelines name their scheduler ["dmdscale", "DMD2Scheduler"] in model_index.json
and diffusers looks that up as an attribute of the imported `dmdscale` module; it also reads
`SchedulerMixin` there to learn how to load the component.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"DMD2Scheduler": "dmdscale.export", "SchedulerMixin": "dmdscale.export"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dmdscale' has no attribute {name!r}")
