"""Backward simulation on a pool of Ray actors, ahead of the trainer (multi-step students).

For iteration `step` a multi-step student trains on its own input at depth k = draw_k(step):
the current generator run, without gradients, through the first k of its timesteps from pure
noise and re-noised to t_k (`backward_simulate`). That costs up to len(timesteps) - 1 generator
forwards per iteration. Here actors, each holding a copy of the generator, compute those inputs
a few iterations ahead while the trainer works on the current one.

The rollout for (step, rank) is exactly the call DMD2Step.generator_input makes inline, seeded
per iteration by `simulation_seed`; only the weights may differ: the actor's copy is the one
rank 0 last published, counted in versions. `version_at` says which version the trainer holds
at any iteration, so a rollout made with weights more than `rollout.max_staleness` versions
older is dropped and redone. With max_staleness 0 (and publish_every 1) training follows the
inline run exactly. k = 0 (pure noise) needs no generator and is drawn by the client itself;
an actor that dies is replaced and its requests sent again.

Training loop, on every rank (see RolloutPool):

    pool = RolloutPool.create(cfg, build_generator, rank, world_size, device)
    pool.start(start_step, state_dict_fn)
    for step, batch in zip(range(start_step, max_steps), pool.attach(batches, start_step)):
        metrics = step_fn(batch, step)
        pool.after_step(step, state_dict_fn)
    pool.close()
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import ray
import torch
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from torch import Tensor, nn

from dmdscale.config import Config
from dmdscale.core.sampling import NoiseStream, backward_simulate, draw_k, simulation_seed
from dmdscale.core.step import Batch
from dmdscale.core.networks import Cond
from dmdscale.core.precision import autocast

StateDict = dict[str, Tensor]
STORE_NAMESPACE = "dmdscale"
# A request whose actor dies this many times in a row is not retried again: the actors cannot
# start (e.g. build_generator fails), and replacing them forever would hide that.
MAX_ATTEMPTS = 3


# -- weight versions ----------------------------------------------------------------------------
def version_at(step: int, ttur_ratio: int, publish_every: int) -> int:
    """The weight version the trainer holds at the start of iteration `step`.

    Generator updates happen at steps 0, r, 2r, ... (r = ttur_ratio), so ceil(step / r) of
    them are complete before `step`; a version is published after every `publish_every` of
    them. A pure function, so every rank knows the current version without communicating.
    """
    updates_done = (step + ttur_ratio - 1) // ttur_ratio
    return updates_done // publish_every


def publishes_after(step: int, ttur_ratio: int, publish_every: int) -> bool:
    """Whether rank 0 publishes the generator's weights after iteration `step`: it updated the
    generator and the updates so far are a multiple of publish_every."""
    return step % ttur_ratio == 0 and (step // ttur_ratio + 1) % publish_every == 0


# -- requests and results ------------------------------------------------------------------------
@dataclass
class RolloutRequest:
    """What an actor needs to reproduce one iteration's backward simulation (all on CPU)."""

    step: int
    shape: tuple[int, ...]  # this rank's batch of images
    dtype: torch.dtype
    cond: Cond
    rank: int = 0
    world_size: int = 1


@dataclass
class Rollout:
    """The generator's input for one iteration, and the weight version that made it."""

    step: int
    k: int
    t: int  # the timestep t_k the input is noised to
    x_in: Tensor
    t_in: Tensor
    cond: Cond
    version: int


@dataclass
class ServedRollout:
    """A small record of a rollout handed to the trainer (for stats and tests)."""

    step: int
    k: int
    version: int  # the weights it was made with (for k = 0, none were needed: the trainer's)
    staleness: int  # version_at(step) - version
    local: bool  # k = 0: computed by the client, no actor involved


def _to(cond: Cond, device: torch.device | str) -> Cond:
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v.to(device) for k, v in cond.items()}
    return cond.to(device)


def simulate_rollout(generator: nn.Module | None, timesteps: list[int], seed: int, mixed_precision: str,
                     request: RolloutRequest, device: torch.device, version: int) -> Rollout:
    """One iteration's backward simulation, exactly as DMD2Step.generator_input runs it inline.

    `generator` may be None when k = 0 (pure noise, no forward)."""
    k = draw_k(request.step, len(timesteps), seed)
    rng = NoiseStream(torch.Generator(device).manual_seed(simulation_seed(seed, request.step)),
                      request.rank, request.world_size)
    cond = _to(request.cond, device)
    schedule = generator.schedule if generator is not None else None
    with autocast(device, mixed_precision):  # as DMD2Step wraps its simulation: the same numerics
        x_in, t_in = backward_simulate(generator, schedule, timesteps, k, request.shape, cond, rng,
                                       device, request.dtype)
    return Rollout(request.step, k, timesteps[k], x_in, t_in, request.cond, version)


# -- actors ----------------------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class WeightStore:
    """The newest published generator weights: (version, [ObjectRef of a CPU state_dict]).

    The ref travels inside a list so Ray hands it over as a ref instead of resolving it; each
    actor fetches the weights itself, only when its version is behind. Async, so `latest`
    can wait for a version other ranks need before rank 0 has published it.
    """

    def __init__(self) -> None:
        self.version = -1
        self.refs: list[ray.ObjectRef] = []
        self.changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        if self.changed is None:  # created in the actor's event loop
            self.changed = asyncio.Condition()
        return self.changed

    async def publish(self, version: int, refs: list[ray.ObjectRef]) -> None:
        async with self._condition():
            if version > self.version:  # never go back to older weights
                self.version, self.refs = version, refs
                self._condition().notify_all()

    async def latest(self, min_version: int = 0) -> tuple[int, list[ray.ObjectRef]]:
        async with self._condition():
            await self._condition().wait_for(lambda: self.version >= min_version)
            return self.version, self.refs


@ray.remote
class RolloutActor:
    """A generator copy that runs backward simulation for the trainer's requests."""

    def __init__(self, build_generator: Callable[[], nn.Module], timesteps: list[int], seed: int,
                 mixed_precision: str, device: str, cpu_threads: int) -> None:
        self.device = torch.device(device)
        if self.device.type == "cpu":
            # Ray sets OMP_NUM_THREADS from the reservation; keep torch to what we reserved.
            torch.set_num_threads(cpu_threads)
        # Weights come with the first request; no gradients are ever taken here. eval() where the
        # trainer's copy is in train mode: dmdscale's generators have no dropout or batch norm,
        # so both compute the same.
        self.generator = build_generator().to(self.device).eval().requires_grad_(False)
        self.timesteps, self.seed, self.mixed_precision = list(timesteps), seed, mixed_precision
        self.version = -1

    def simulate(self, request: RolloutRequest, version: int, refs: list[ray.ObjectRef]) -> Rollout:
        if version != self.version:
            self.generator.load_state_dict(ray.get(refs[0]))
            self.version = version
        rollout = simulate_rollout(self.generator, self.timesteps, self.seed, self.mixed_precision,
                                   request, self.device, version)
        rollout.x_in, rollout.t_in = rollout.x_in.cpu(), rollout.t_in.cpu()
        return rollout

    def loaded_version(self) -> int:
        return self.version


@dataclass
class _Pending:
    """A request in flight: which actor has it, so a death is blamed on the right slot."""

    request: RolloutRequest
    slot: int
    actor: Any
    ref: ray.ObjectRef
    attempts: int = 1


# -- the client ----------------------------------------------------------------------------------
class RolloutPool:
    """This rank's rollout actors, and the weight store they read (created by rank 0).

    Every rank calls, in order: `start` once, `attach` once to wrap its batches, `after_step`
    after every iteration, `close` at the end. See the module docstring.
    """

    def __init__(self, cfg: Config, build_generator: Callable[[], nn.Module], store: Any, store_owner: bool,
                 rank: int, world_size: int, device: torch.device | str):
        timesteps = cfg.generator.timesteps
        if len(timesteps) < 2 or not cfg.generator.backward_simulation:
            raise ValueError("rollout actors run backward simulation: they need a multi-step student "
                             f"(generator.timesteps={timesteps}) with generator.backward_simulation on")
        self.cfg, self.build_generator = cfg, build_generator
        self.store, self.store_owner = store, store_owner
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)
        self.timesteps, self.seed = list(timesteps), cfg.train.seed
        self.ttur_ratio, self.publish_every = cfg.train.ttur_ratio, cfg.rollout.publish_every
        self.max_staleness, self.lookahead = cfg.rollout.max_staleness, cfg.rollout.lookahead
        self.num_gpus = cfg.rollout.actor_gpus if cfg.scale.use_gpu else 0.0
        self.actors = [self._new_actor() for _ in range(cfg.rollout.num_actors)]
        self._next_slot = 0  # round-robin over the actors
        self.version = -1  # the version the trainer holds; the same number on every rank
        self._published: list[ray.ObjectRef] = []  # rank 0 keeps its newest weights alive too
        self.served: collections.deque[ServedRollout] = collections.deque(maxlen=10_000)
        self.counts = {"served": 0, "served_local": 0, "dropped_stale": 0, "actors_replaced": 0}
        self._staleness_sum = 0
        self._staleness_max = 0
        self._closed = False

    @classmethod
    def create(cls, cfg: Config, build_generator: Callable[[], nn.Module], rank: int = 0, world_size: int = 1,
               device: torch.device | str = "cpu") -> "RolloutPool":
        """Rank 0 creates the weight store under a fresh name and tells the other ranks (a
        collective when torch.distributed is up); each rank starts its own actors."""
        name = None
        if rank == 0:
            name = f"rollout-weights-{uuid.uuid4().hex[:12]}"
            store = WeightStore.options(name=name, namespace=STORE_NAMESPACE).remote()
        if world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            box = [name]
            torch.distributed.broadcast_object_list(box, src=0, device=torch.device(device))
            name = box[0]
        if rank != 0:
            if name is None:
                raise RuntimeError("ranks other than 0 need torch.distributed to learn the weight store's name")
            store = ray.get_actor(name, namespace=STORE_NAMESPACE)
        return cls(cfg, build_generator, store, rank == 0, rank, world_size, device)

    def _new_actor(self) -> Any:
        # Soft affinity to this node: a worker's actors share its GPU in the resource plan.
        node = ray.get_runtime_context().get_node_id()
        strategy = NodeAffinitySchedulingStrategy(node, soft=True)
        device = "cuda" if self.num_gpus > 0 else "cpu"
        cpus = self.cfg.rollout.actor_cpus
        return RolloutActor.options(num_cpus=cpus, num_gpus=self.num_gpus, scheduling_strategy=strategy).remote(
            self.build_generator, self.timesteps, self.seed, self.cfg.train.mixed_precision, device,
            max(1, int(cpus)))

    # -- weights ----------------------------------------------------------------------------------
    def _publish(self, version: int, state_dict_fn: Callable[[], StateDict]) -> None:
        # Every rank calls state_dict_fn: under ZeRO-3 gathering the weights is a collective.
        state = state_dict_fn()
        if self.store_owner:
            # ray.put serialises now: a snapshot even of live parameters.
            ref = ray.put({k: v.detach().to("cpu") for k, v in state.items()})
            ray.get(self.store.publish.remote(version, [ref]))
            self._published = [ref]
        self.version = version

    def start(self, start_step: int, state_dict_fn: Callable[[], StateDict]) -> None:
        """Publish the weights the trainer holds at `start_step` (0, or where a resumed run
        continues), so actors have weights before the first request."""
        self._publish(version_at(start_step, self.ttur_ratio, self.publish_every), state_dict_fn)

    def after_step(self, step: int, state_dict_fn: Callable[[], StateDict]) -> None:
        """After iteration `step`, on every rank: publish when the generator's updates so far
        complete a version."""
        if publishes_after(step, self.ttur_ratio, self.publish_every):
            self._publish(version_at(step + 1, self.ttur_ratio, self.publish_every), state_dict_fn)

    def version_at(self, step: int) -> int:
        return version_at(step, self.ttur_ratio, self.publish_every)

    # -- requests ---------------------------------------------------------------------------------
    def _request(self, step: int, batch: Batch) -> RolloutRequest:
        return RolloutRequest(step, tuple(batch.images.shape), batch.images.dtype, _to(batch.cond, "cpu"),
                              self.rank, self.world_size)

    def _submit(self, request: RolloutRequest, min_version: int, attempts: int = 1) -> _Pending:
        """Send a request to the next actor with the newest weights of at least min_version."""
        version, refs = ray.get(self.store.latest.remote(min_version))
        slot, self._next_slot = self._next_slot, (self._next_slot + 1) % len(self.actors)
        actor = self.actors[slot]
        return _Pending(request, slot, actor, actor.simulate.remote(request, version, refs), attempts)

    def _result(self, pending: _Pending, min_version: int) -> Rollout:
        """Wait for a rollout; an actor that died is replaced at its slot and the request sent again."""
        while True:
            try:
                return ray.get(pending.ref)
            except RayActorError:  # ActorDiedError included
                if pending.attempts >= MAX_ATTEMPTS:
                    raise
                if self.actors[pending.slot] is pending.actor:  # not yet replaced for another request
                    self.actors[pending.slot] = self._new_actor()
                    self.counts["actors_replaced"] += 1
                pending = self._submit(pending.request, min_version, pending.attempts + 1)

    def _serve(self, step: int, pending: _Pending | None, batch: Batch) -> Rollout:
        """The rollout for iteration `step`, redone until it is no more than max_staleness
        versions behind the trainer's weights."""
        needed = self.version_at(step)
        if pending is None:  # k = 0: pure noise, the same draw here as anywhere
            rollout = simulate_rollout(None, self.timesteps, self.seed, self.cfg.train.mixed_precision,
                                       self._request(step, batch), self.device, needed)
            self.served.append(ServedRollout(step, rollout.k, needed, 0, True))
            self.counts["served"] += 1
            self.counts["served_local"] += 1
            return rollout
        oldest_ok = needed - self.max_staleness
        rollout = self._result(pending, oldest_ok)
        while needed - rollout.version > self.max_staleness:
            self.counts["dropped_stale"] += 1
            # Rank 0 has published `needed` before asking for this batch; other ranks may
            # have to wait for it here, hence latest(min_version).
            rollout = self._result(self._submit(pending.request, oldest_ok), oldest_ok)
        staleness = needed - rollout.version
        self.served.append(ServedRollout(step, rollout.k, rollout.version, staleness, False))
        self.counts["served"] += 1
        self._staleness_sum += staleness
        self._staleness_max = max(self._staleness_max, staleness)
        return rollout

    def attach(self, batches: Iterator[Batch], start_step: int) -> Iterator[Batch]:
        """Yield the batches for iterations start_step, start_step + 1, ... with
        `generator_input` set, keeping `rollout.lookahead` iterations requested ahead.

        Requests are made with the newest weights the store has; the trainer calls
        `after_step(s - 1)` before it asks for batch s.
        """
        source = iter(batches)
        window: collections.deque[tuple[int, Batch, _Pending | None]] = collections.deque()
        next_request, current = start_step, start_step
        while True:
            # Keep `lookahead` iterations requested beyond the one the trainer asks for now,
            # with the weights it holds now (the newest; later ones may still be fresh enough).
            while len(window) <= self.lookahead:
                batch = next(source, None)
                if batch is None:
                    break
                k = draw_k(next_request, len(self.timesteps), self.seed)
                pending = (self._submit(self._request(next_request, batch), self.version_at(current))
                           if k > 0 else None)
                window.append((next_request, batch, pending))
                next_request += 1
            if not window:
                return
            step, batch, pending = window.popleft()
            rollout = self._serve(step, pending, batch)
            yield dataclasses.replace(batch, generator_input=(rollout.x_in.to(self.device),
                                                              rollout.t_in.to(self.device)))
            current = step + 1

    # -- reporting and shutdown -------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Counts since creation; staleness over actor-made rollouts (k = 0 needs no weights)."""
        from_actors = self.counts["served"] - self.counts["served_local"]
        return {**{k: float(v) for k, v in self.counts.items()},
                "mean_staleness": self._staleness_sum / from_actors if from_actors else 0.0,
                "max_staleness": float(self._staleness_max),
                "version": float(self.version)}

    def close(self) -> None:
        """Kill this rank's actors (and the store, on rank 0). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for actor in self.actors:
            ray.kill(actor)
        if self.store_owner:
            ray.kill(self.store)
        self._published = []
