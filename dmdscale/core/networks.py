"""The one score-network interface every family implements (`Denoiser`), the critic built on it,
and conditioning: what the DMD2 math calls; the adapters for each kind of network are in models/."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Union

import torch
from torch import Tensor, nn

from dmdscale.core.schedule import Schedule

# Conditioning: None (unconditional), a tensor (class labels) or a dict of tensors (text).
Cond = Union[None, Tensor, dict[str, Tensor]]


def cat_cond(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditionings along the batch axis (for one batched CFG forward)."""
    if a is None:
        return None
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


class Denoiser(nn.Module):
    """A score network seen as a denoiser: x0 = model(x_t, t, cond, guidance_scale).

    Subclasses implement `predict` (the native output: eps, v or x0, per `prediction_type`)
    and `features` (the bottleneck the discriminator head reads), and `null_cond` where the
    family has an unconditional input for classifier-free guidance.
    """

    prediction_type: str = "epsilon"

    def __init__(self, schedule: Schedule):
        super().__init__()
        self.schedule = schedule

    def predict(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        raise NotImplementedError

    def features(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        raise NotImplementedError

    def null_cond(self, cond: Cond) -> Cond:
        """The unconditional input matching `cond`; None where the family has none."""
        return None

    def time_embedding_layer(self) -> tuple[nn.Module, int]:
        """(the layer whose output is the network's time embedding, its width): where a
        step-conditioned critic adds its step embedding (loss.step_conditioned_critic)."""
        raise ValueError(f"loss.step_conditioned_critic: {type(self).__name__} has no time embedding "
                         f"layer to condition on the student's step; set it false")

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the network's activations in backward (train.gradient_checkpointing), through
        the diffusers model's own switch."""
        networks = [m for m in self.children() if hasattr(m, "enable_gradient_checkpointing")]
        if not networks:
            raise ValueError(f"train.gradient_checkpointing: {type(self).__name__} has no network that "
                             f"recomputes activations; set it false")
        for network in networks:
            network.enable_gradient_checkpointing()

    def cast_network(self, dtype: torch.dtype) -> "Denoiser":
        """The network's floating parameters and buffers in `dtype`, in place; the noise
        schedule keeps its float64 alphas (a plain `.to(dtype)` would round them too)."""
        for child in self.children():
            if child is not self.schedule:
                child.to(dtype)
        for param in self.parameters(recurse=False):
            param.data = param.data.to(dtype)
        for name, buffer in self.named_buffers(recurse=False):
            if buffer.is_floating_point():
                self._buffers[name] = buffer.to(dtype)
        return self

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond = None, guidance_scale: float = 1.0) -> Tensor:
        uncond = self.null_cond(cond) if guidance_scale != 1.0 else None
        if uncond is None:
            return self.schedule.to_x0(self.predict(x_t, t, cond), x_t, t, self.prediction_type)
        # CFG in x0 space equals CFG in eps space: x0 is affine in eps at fixed (x_t, t).
        out = self.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(cond, uncond))
        x0_cond, x0_uncond = self.schedule.to_x0(
            out, torch.cat([x_t, x_t]), torch.cat([t, t]), self.prediction_type
        ).chunk(2)
        return x0_uncond + guidance_scale * (x0_cond - x0_uncond)


# Adam moves each embedding entry by about the LR per update: at a second stage's 1e-4 a zero-
# started embedding would take ~5k updates to reach the time embedding's scale (~0.5).
STEP_EMBEDDING_GAIN = 30.0


class Critic(nn.Module):
    """Fake score + discriminator head: trained together, by one optimizer.

    With `num_steps` (a multi-step student and loss.step_conditioned_critic), a learned
    embedding of the student's step, zero at the start, is added to the fake score's time
    embedding inside `at_step(k)`: the fake score then models each step's outputs apart and
    the discriminator tells real from step k's. A shared critic models only the mixture of
    the steps' outputs, and the DM loss then matches the mixture to the data, not each step.
    """

    def __init__(self, fake_score: Denoiser, head: nn.Module, num_steps: int = 0):
        super().__init__()
        self.fake_score = fake_score
        self.head = head
        self.step: int | None = None  # set by at_step
        self.step_embedding: nn.Embedding | None = None
        if num_steps:
            layer, width = fake_score.time_embedding_layer()
            self.step_embedding = nn.Embedding(num_steps, width)
            nn.init.zeros_(self.step_embedding.weight)  # starts as the shared critic it replaces
            layer.register_forward_hook(self._add_step_embedding)

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """GAN logits, one per sample, from the fake score's bottleneck."""
        return self.head(self.fake_score.features(x_t, t, cond)).flatten(1).mean(1)

    @contextlib.contextmanager
    def at_step(self, k: int | Tensor | None) -> Iterator[None]:
        """Forwards inside judge the student's step k, one for the batch or a (B,) tensor of one
        per row (a no-op without a step embedding or k)."""
        previous, self.step = self.step, k
        try:
            yield
        finally:
            self.step = previous

    def _add_step_embedding(self, layer: nn.Module, inputs: Any, out: Tensor) -> Tensor | None:
        if self.step is None:
            return None
        # One step for the batch, or (generator.step_draw: row) one per row.
        index = self.step.to(out.device) if isinstance(self.step, Tensor) else torch.tensor([self.step], device=out.device)
        step_embedding = self.step_embedding(index) * STEP_EMBEDDING_GAIN  # a module call: ZeRO-3 gathers it
        return out + step_embedding.to(out.dtype)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        # A first stage's critic (no step embedding) starts a step-conditioned one at zero.
        if self.step_embedding is not None and "step_embedding.weight" not in state_dict:
            state_dict = {**state_dict, "step_embedding.weight": torch.zeros_like(self.step_embedding.weight)}
        return super().load_state_dict(state_dict, strict, assign)


class requires_grad:
    """Context manager: temporarily set requires_grad on every parameter of a module."""

    def __init__(self, module: nn.Module, flag: bool):
        self.params = list(module.parameters())
        self.flag = flag

    def __enter__(self) -> None:
        self.saved = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(self.flag)

    def __exit__(self, *exc: Any) -> None:
        for p, s in zip(self.params, self.saved):
            p.requires_grad_(s)
