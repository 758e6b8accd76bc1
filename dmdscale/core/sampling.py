"""Few-step sampling, backward simulation, and the teacher's deterministic many-step sampler."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from dmdscale.core import seeds
from dmdscale.core.schedule import Schedule
from dmdscale.core.networks import Cond, Denoiser

# x0 = G(x_t, t, cond): the generator as the step sees it.
GeneratorFn = Callable[[Tensor, Tensor, Cond], Tensor]


def _full(t: int, n: int, device: torch.device) -> Tensor:
    return torch.full((n,), t, dtype=torch.long, device=device)


class NoiseStream:
    """This rank's rows of a global random draw.

    Every rank seeds the same generator and draws for the whole global batch (world x its own
    rows), then keeps rows [rank*n, (rank+1)*n). Sample i of the global batch therefore gets
    the same noise however the batch is split over workers, which is what makes 2 workers with
    batch b/2 follow 1 worker with batch b. Draws are cheap next to a UNet forward.
    """

    def __init__(self, generator: torch.Generator, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size}")
        self.generator, self.rank, self.world_size = generator, rank, world_size

    def randn(self, shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype) -> Tensor:
        n = shape[0]
        full = torch.randn((n * self.world_size, *shape[1:]), generator=self.generator, device=device, dtype=dtype)
        return full[self.rank * n:(self.rank + 1) * n]

    def randint(self, low: int, high: int, n: int, device: torch.device | str) -> Tensor:
        full = torch.randint(low, high, (n * self.world_size,), generator=self.generator, device=device)
        return full[self.rank * n:(self.rank + 1) * n]

    def get_state(self) -> Tensor:
        return self.generator.get_state()

    def set_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


Rng = torch.Generator | NoiseStream | None


def randn(shape: tuple[int, ...], rng: Rng, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    if isinstance(rng, NoiseStream):
        return rng.randn(shape, device, dtype)
    return torch.randn(shape, generator=rng, device=device, dtype=dtype)


def _randn_like(x: Tensor, rng: Rng) -> Tensor:
    return randn(tuple(x.shape), rng, x.device, x.dtype)


@torch.no_grad()
def sample(generator: GeneratorFn, schedule: Schedule, noise: Tensor, timesteps: list[int],
           cond: Cond = None, rng: Rng = None) -> Tensor:
    """Few-step sampling: for each t, x0 = G(x, t); x = add_noise(x0, fresh noise, next t).
    Starts from pure noise at timesteps[0] and returns the last x0."""
    x = noise
    x0 = noise
    for i, t in enumerate(timesteps):
        x0 = generator(x, _full(t, len(x), x.device), cond)
        if i + 1 < len(timesteps):
            x = schedule.add_noise(x0, _randn_like(x0, rng), _full(timesteps[i + 1], len(x), x.device))
    return x0


def draw_k(step: int, num_steps: int, seed: int) -> int:
    """Backward-simulation depth for an iteration, uniform in {0..num_steps-1}.

    A pure function of (seed, step), so every rank draws the same k without communicating.
    """
    rng = torch.Generator().manual_seed(seeds.simulation_depth(seed, step))
    return int(torch.randint(num_steps, (1,), generator=rng))


def simulation_seed(seed: int, step: int) -> int:
    """Seed of an iteration's backward-simulation noise: a pure function of (seed, step), so a
    rollout actor handed the same request draws exactly what the trainer would inline."""
    return seeds.simulation_noise(seed, step)


@torch.no_grad()
def backward_simulate(generator: GeneratorFn, schedule: Schedule, timesteps: list[int], k: int,
                      shape: tuple[int, ...], cond: Cond = None, rng: Rng = None,
                      device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                      ) -> tuple[Tensor, Tensor]:
    """The generator's own input at step k, as inference would produce it (DMD2 sec. 4.5).

    Runs the current generator through the first k steps from fresh pure noise, then re-noises
    the resulting x0 to t_k with noise independent of everything used in the simulation (the
    authors saw artefacts with correlated noise). k = 0 is pure noise at t_0.
    Returns (x_{t_k}, t_k as a (B,) tensor).
    """
    if not 0 <= k < len(timesteps):
        raise ValueError(f"k must be in [0, {len(timesteps) - 1}], got {k}")
    device = torch.device(device)
    n = shape[0]
    x = randn(shape, rng, device, dtype)
    if k == 0:
        return x, _full(timesteps[0], n, device)
    x0 = sample(generator, schedule, x, timesteps[:k], cond, rng)
    t_k = _full(timesteps[k], n, device)
    return schedule.add_noise(x0, _randn_like(x0, rng), t_k), t_k


def row_steps(step: int, num_steps: int, seed: int, n: int, rank: int = 0, world_size: int = 1,
              device: torch.device | str = "cpu") -> Tensor:
    """Per-row backward-simulation depths (generator.step_draw: row): the global batch's rows
    cycle through every student step from a depth drawn per iteration (`draw_k`), so each
    batch holds every step in equal shares; this rank keeps its rows."""
    offset = draw_k(step, num_steps, seed)
    rows = torch.arange(rank * n, (rank + 1) * n, device=device)
    return (rows + offset) % num_steps


@torch.no_grad()
def backward_simulate_rows(generator: GeneratorFn, schedule: Schedule, timesteps: list[int], ks: Tensor,
                           shape: tuple[int, ...], cond: Cond = None, rng: Rng = None,
                           device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                           ) -> tuple[Tensor, Tensor]:
    """`backward_simulate` with a depth per row (`ks`, (B,)): each row runs the generator through
    its own first k steps from fresh noise and is re-noised to its t_k, as `backward_simulate`
    does for a whole batch. Noise is drawn for every row at every depth (so a NoiseStream stays
    the same on every rank); a generator call takes only the rows still simulating."""
    device = torch.device(device)
    times = torch.tensor(timesteps, dtype=torch.long, device=device)
    ks = ks.to(device)
    x = randn(shape, rng, device, dtype)
    for i in range(int(ks.max())):
        active = ks > i
        noise = randn(shape, rng, device, dtype)
        rows = active.nonzero().flatten()
        x0 = generator(x[rows], _full(timesteps[i], len(rows), device), index_cond(cond, rows))
        x[rows] = schedule.add_noise(x0.to(dtype), noise[rows], _full(timesteps[i + 1], len(rows), device))
    return x, times[ks]


def index_cond(cond: Cond, rows: Tensor) -> Cond:
    """The conditioning of `rows` (labels, a text-embedding dict, or None)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v[rows] for k, v in cond.items()}
    return cond[rows]


# `teacher_sample` as a cache key (the teacher's evaluation samples, the anchor's ODE pairs):
# change it when `teacher_sample` changes what it draws, so cached outputs are drawn anew.
TEACHER_SAMPLER = "core.sampling.teacher_sample, v1"


@torch.no_grad()
def teacher_sample(teacher: Denoiser, noise: Tensor, num_steps: int, cond: Cond = None,
                   guidance_scale: float = 1.0) -> Tensor:
    """The teacher's deterministic many-step sampler (`schedule.sampler`: DDIM for VP, Euler for flow), fed x0."""
    sampler = teacher.schedule.sampler(num_steps)
    x = noise
    for t in sampler.timesteps:
        tt = _full(int(t), len(x), x.device)
        x0 = teacher(x, tt, cond, guidance_scale)
        x = sampler.step(x0.to(x.dtype), int(t), x).prev_sample
    return x
