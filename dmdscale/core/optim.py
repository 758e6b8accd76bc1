"""A trainable module with its optimizer, in plain PyTorch (one process).

The DMD2 step talks to its generator and critic only through this small interface:
`.module`, `.backward(loss)`, `.step() -> grad norm`, `.zero_grad()`. The DeepSpeed engines
in `dmdscale.distributed.engine` implement the same interface, so the step never knows which it drives.
"""
from __future__ import annotations

import functools
import math
from typing import Protocol

import torch
from torch import Tensor, nn

from dmdscale.config import TrainConfig


class OptimizedModule(Protocol):
    module: nn.Module

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> float: ...

    def zero_grad(self) -> None: ...


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Constant learning rate after a linear warm-up (the paper: 500 steps)."""
    return 1.0 if warmup_steps == 0 else min(1.0, (step + 1) / warmup_steps)


def warmup_lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of every trainable module, plain or DeepSpeed."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(warmup_factor, warmup_steps=warmup_steps))


class TorchOptimizedModule:
    """AdamW (betas, weight decay from config), linear warm-up, gradient-norm clipping.
    A step whose gradient norm is not finite is skipped, never applied."""

    def __init__(self, module: nn.Module, cfg: TrainConfig):
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.scheduler = warmup_lr_scheduler(self.optimizer, cfg.warmup_steps)
        self.grad_clip = cfg.grad_clip

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip))
        if math.isfinite(norm):
            self.optimizer.step()
            self.scheduler.step()
        self.zero_grad()
        return norm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
