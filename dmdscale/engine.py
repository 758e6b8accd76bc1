"""DeepSpeed ZeRO engines behind the interface the DMD2 step uses (`dmdscale.optim`).

The generator and the critic each get their own engine (own optimiser, own ZeRO partitioning);
the frozen teacher stays a plain module. gloo on CPU, NCCL on GPU: DeepSpeed uses the process
group Ray Train already created.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dmdscale.config import ScaleConfig, TrainConfig


def deepspeed_config(train: TrainConfig, scale: ScaleConfig, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for one trainable module (AdamW, warm-up, clipping, ZeRO)."""
    zero: dict[str, Any] = {"stage": scale.zero_stage}
    if scale.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": scale.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: torch's AdamW instead of compiling DeepSpeed's fused kernel (~45 s on CPU).
            "params": {"lr": train.lr, "betas": list(train.betas), "weight_decay": train.weight_decay,
                       "torch_adam": True},
        },
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": train.lr,
                       "warmup_num_steps": max(train.warmup_steps, 1), "warmup_type": "linear"},
        },
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": train.mixed_precision == "bf16"},
        "steps_per_print": 10**9,  # progress goes through Ray Train reports, not DeepSpeed logs
        "wall_clock_breakdown": False,
    }


def ensure_single_process_env() -> None:
    """DeepSpeed outside a launcher needs the torch.distributed env vars (else it looks for MPI)."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(key, value)


class DeepSpeedOptimizedModule:
    """A module trained by a DeepSpeed engine; same interface as TorchOptimizedModule."""

    def __init__(self, module: nn.Module, train: TrainConfig, scale: ScaleConfig, micro_batch: int):
        import deepspeed

        if not torch.distributed.is_initialized():
            ensure_single_process_env()
        params = [p for p in module.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, model_parameters=params, config=deepspeed_config(train, scale, micro_batch),
            dist_init_required=not torch.distributed.is_initialized(),
        )
        self.module = self.engine.module

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    def save(self, directory: str | Path, tag: str) -> None:
        """Engine state (weights, optimiser, scheduler) under directory/tag; a collective call."""
        self.engine.save_checkpoint(str(directory), tag=tag)

    def load(self, directory: str | Path, tag: str) -> None:
        self.engine.load_checkpoint(str(directory), tag=tag)
