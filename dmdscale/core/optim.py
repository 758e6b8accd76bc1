"""A trainable module with its optimizer, in plain PyTorch (one process).

The DMD2 step talks to its generator and critic only through this small interface:
`.module`, `.backward(loss)`, `.step() -> grad norm`, `.zero_grad()`. The DeepSpeed engines
in `dmdscale.distributed.engine` implement the same interface, so the step never knows which it drives.
"""
from __future__ import annotations

import functools
import math
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from dmdscale.config import TrainConfig


class OptimizedModule(Protocol):
    module: nn.Module

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> float: ...

    def zero_grad(self) -> None: ...


Role = Literal["generator", "critic"]


def warmup_factor(update: int, warmup_steps: int, iterations_per_update: int = 1) -> float:
    """Constant learning rate after a linear warm-up over `warmup_steps` iterations (the paper:
    500). A player updated every `iterations_per_update` iterations makes its update k at
    iteration k * iterations_per_update, so its warm-up runs on the iteration clock."""
    if warmup_steps == 0:
        return 1.0
    return min(1.0, (update * iterations_per_update + 1) / warmup_steps)


def decay_factor(iteration: int, max_steps: int, kind: str = "constant") -> float:
    """The learning rate's decay at `iteration` of `max_steps`: none ("constant", the paper's)
    or a half cosine from 1 to 0 over the run ("cosine"), which settles the last weights of a
    short run where a constant rate leaves them oscillating."""
    if kind == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(iteration, max_steps) / max_steps))


def lr_factor(update: int, train: TrainConfig, iterations_per_update: int = 1) -> float:
    """The learning rate of a player's update `update` relative to its base rate: the warm-up
    times the decay, both on the iteration clock."""
    iteration = update * iterations_per_update
    return (warmup_factor(update, train.warmup_steps, iterations_per_update)
            * decay_factor(iteration, train.max_steps, train.lr_decay))


def learning_rate(train: TrainConfig, role: Role) -> float:
    return train.critic_lr if role == "critic" and train.critic_lr is not None else train.lr


def warmup_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, role: Role
                        ) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of every trainable module, plain or DeepSpeed: the generator
    updates once every ttur_ratio iterations, the critic every iteration."""
    per_update = train.ttur_ratio if role == "generator" else 1
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, train=train, iterations_per_update=per_update))


class TorchOptimizedModule:
    """AdamW (betas, weight decay from config; the role's learning rate), linear warm-up and
    the configured decay on the iteration clock, gradient-norm clipping.
    A step whose gradient norm is not finite is skipped, never applied."""

    def __init__(self, module: nn.Module, cfg: TrainConfig, *, role: Role):
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=learning_rate(cfg, role), betas=cfg.betas, weight_decay=cfg.weight_decay
        )
        self.scheduler = warmup_lr_scheduler(self.optimizer, cfg, role)
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
