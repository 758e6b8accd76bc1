"""Exponential moving averages of the generator's weights (FastGen's DMD2 keeps them; the
paper's authors did not). Plain torch: the distributed layer saves and gathers them."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import Tensor, nn


def ema_name(decay: float) -> str:
    """How an average is named in metrics, checkpoints and folders: "ema_0.99"."""
    return f"ema_{decay:g}"


def warmup_decay(updates: int, power: float | None = None) -> float:
    """The decay of update k = `updates` (from 0) before any cap: (1 + k) / (10 + k), or with
    `power` EDM2's power-function profile (1 - 1 / (k + 1))^(power + 1) (Karras et al. 2024,
    "Analyzing and Improving the Training Dynamics of Diffusion Models"), whose average weighs
    update j's weights as about j^power: a length that grows with the run."""
    if power is None:
        return (1 + updates) / (10 + updates)
    return (1 - 1 / (updates + 1)) ** (power + 1)


def updates_to_reach(decay: float, power: float | None = None) -> int:
    """Generator updates before the warm-up reaches `decay` (0.97: 290; with power 3, 131):
    until then every update uses the warm-up's decay, whatever was configured."""
    if power is None:
        return math.ceil((10 * decay - 1) / (1 - decay) - 1e-9)
    return max(math.ceil(1 / (1 - decay ** (1 / (power + 1))) - 1 - 1e-9), 0)


def unreached_decays(decays: list[float], generator_updates: int, power: float | None = None) -> list[float]:
    """The decays a run of `generator_updates` never reaches: their averages all equal the
    warm-up's (two such decays give the same weights)."""
    return [d for d in decays if updates_to_reach(d, power) >= generator_updates]


class GeneratorEMA:
    """One float32 copy of the generator's trainable parameters per decay.

    Update k (counted in generator updates, from 0) uses min(decay, warmup_decay(k, power)): the
    usual warm-up (1 + k) / (10 + k), so a short run's average is not dominated by the weights
    it started from (a plain 0.999 would keep 90% of the teacher's weights after 100 updates),
    or with `power` (train.ema_power) the power-function profile, which averages a share of
    the run rather than its last ~9 + k/10 updates.
    """

    def __init__(self, module: nn.Module, decays: list[float], power: float | None = None):
        self.module = module
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        self.decays = list(decays)
        self.power = power
        self.averages = {d: [p.detach().float().clone() for p in self._params()] for d in self.decays}
        self.updates = 0

    def _params(self) -> list[Tensor]:
        named = dict(self.module.named_parameters())
        return [named[name] for name in self.names]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the generator's current weights in (after each applied generator update)."""
        current = [p.detach().float() for p in self._params()]
        warmup = warmup_decay(self.updates, self.power)
        for decay, average in self.averages.items():
            d = min(decay, warmup)
            torch._foreach_lerp_(average, current, 1 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        """{"<ema_name>/<parameter>": tensor, ..., "updates": tensor}, flat for safetensors."""
        out = {f"{ema_name(d)}/{n}": t for d, avg in self.averages.items() for n, t in zip(self.names, avg)}
        out["updates"] = torch.tensor(self.updates)
        return out

    def load_state_dict(self, state: dict[str, Tensor], strict: bool = True) -> list[float]:
        """Load the averages present in `state` and its update count (so a new stage continues
        the averages, its warm-up done); returns the decays loaded. With `strict`, every decay
        of this EMA must be there (a resume); without, missing ones start from the current
        weights (a new stage that adds a decay)."""
        loaded = []
        for decay, average in self.averages.items():
            keys = [f"{ema_name(decay)}/{n}" for n in self.names]
            if all(k in state for k in keys):
                for a, k in zip(average, keys):
                    a.copy_(state[k])
                loaded.append(decay)
            elif strict:
                raise KeyError(f"no {ema_name(decay)} weights in the checkpoint (has: "
                               f"{sorted({k.split('/')[0] for k in state if '/' in k})})")
        if "updates" in state:
            self.updates = int(state["updates"])
        return loaded

    @contextlib.contextmanager
    def swapped_in(self, decay: float) -> Iterator[nn.Module]:
        """The generator with the `decay` average as its weights inside the block (for export
        and evaluation); its own weights are put back afterwards."""
        params = self._params()
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, a in zip(params, self.averages[decay]):
                p.copy_(a)
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    def full_state_dict(self, decay: float) -> dict[str, Tensor]:
        """The generator's whole state dict (CPU) with the `decay` average in place of its
        trainable parameters: what an evaluation actor or an export loads."""
        with self.swapped_in(decay) as module:
            return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
