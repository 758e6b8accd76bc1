"""Exponential moving averages of the generator's weights (FastGen's DMD2 keeps them; the
paper's authors did not). Plain torch: the distributed layer saves and gathers them."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn


def ema_name(decay: float) -> str:
    """How an average is named in metrics, checkpoints and folders: "ema_0.99"."""
    return f"ema_{decay:g}"


class GeneratorEMA:
    """One float32 copy of the generator's trainable parameters per decay.

    Update k (counted in generator updates, from 0) uses min(decay, (1 + k) / (10 + k)): the
    usual warm-up, so a short run's average is not dominated by the weights it started from
    (a plain 0.999 would keep 90% of the teacher's weights after 100 updates).
    """

    def __init__(self, module: nn.Module, decays: list[float]):
        self.module = module
        self.names = [name for name, p in module.named_parameters() if p.requires_grad]
        self.decays = list(decays)
        self.averages = {d: [p.detach().float().clone() for p in self._params()] for d in self.decays}
        self.updates = 0

    def _params(self) -> list[Tensor]:
        named = dict(self.module.named_parameters())
        return [named[name] for name in self.names]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the generator's current weights in (after each applied generator update)."""
        current = [p.detach().float() for p in self._params()]
        for decay, average in self.averages.items():
            d = min(decay, (1 + self.updates) / (10 + self.updates))
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
