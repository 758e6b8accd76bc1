"""Per-GPU memory planner for DMD2, as a command: will a set-up fit? Plans the memory profile of
every family in the registry that carries one (`memory_profile`, defined in the family's folder,
`dmdscale/families/<name>/memory.py`); the method is `dmdscale.tools.memory`.

    python -m dmdscale.memory --family sdxl --gpus 1 2 4 8 --gpu-memory 80 --micro-batch 1 [--json]
    python -m dmdscale.memory --family sd3 flux --min-gpus   # fewest 80 GiB GPUs per set-up
    python -m dmdscale.memory --family sd3 --gpus 8 16 --shard-teacher   # teacher partitioned (ZeRO-3)
"""
from __future__ import annotations

from collections.abc import Sequence

from dmdscale.families import FAMILIES
from dmdscale.tools.memory import MemoryProfile
from dmdscale.tools.memory import main as plan_main

DEFAULT = ("sdxl",)  # what the bare command plans (when a family carries that profile)


def profiles() -> dict[str, MemoryProfile]:
    """Name -> memory profile of every registered family that carries one, in registry order."""
    return {f.memory_profile.name: f.memory_profile for f in FAMILIES.values() if f.memory_profile is not None}


def main(argv: Sequence[str] | None = None) -> None:
    plan_main(argv, profiles(), default=DEFAULT)


if __name__ == "__main__":
    main()
