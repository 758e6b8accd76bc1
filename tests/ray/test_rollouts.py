"""Backward simulation on rollout actors: the same training as inline, fresh weights, staleness
bounds, and actors replaced when they die. Toy 2-D models on a real local Ray cluster."""
import dataclasses
import functools

import pytest
import ray
import torch

from dmdscale.config import build_config
from dmdscale.core.optim import TorchOptimizedModule
from dmdscale.core.schedule import NoiseSchedule
from dmdscale.core.step import Batch, DMD2Step
from dmdscale.distributed.rollouts import (
    RolloutPool,
    RolloutRequest,
    WeightStore,
    publishes_after,
    simulate_rollout,
    version_at,
)
from dmdscale.core.networks import Critic
from dmdscale.models.heads import MLPHead
from dmdscale.families.toy2d.model import GaussianMixture2D, MixtureDenoiser, MLPDenoiser

STEPS = 12
BASE = {"train.batch_size": 16, "train.warmup_steps": 0, "train.lr": 1e-3, "train.ttur_ratio": 2,
        "generator.timesteps": [999, 749, 499, 249],
        "loss.gan_generator_weight": 0.1, "loss.gan_critic_weight": 0.1,
        "rollout.mode": "actors", "rollout.num_actors": 1, "rollout.publish_every": 1,
        "rollout.max_staleness": 0, "rollout.lookahead": 2, "rollout.actor_cpus": 0.5}


# The generator's architecture, built inside each actor (its weights come from the store). A
# partial of an importable class: actors cannot import this test module by name.
BUILD = functools.partial(MLPDenoiser, NoiseSchedule.ddpm(), 2, 16, 2)


def make_step(overrides=None, rank=0, world_size=1):
    """A plain-process DMD2Step; the same initial weights on every call."""
    cfg = build_config({}, {**BASE, **(overrides or {})})
    torch.manual_seed(0)
    sched, mixture = NoiseSchedule.ddpm(), GaussianMixture2D()
    gen = BUILD()
    critic = Critic(MLPDenoiser(sched, 2, 16, 2), MLPHead(16, 16))
    step = DMD2Step(cfg, MixtureDenoiser(mixture, sched), TorchOptimizedModule(gen, cfg.train, role="generator"),
                    TorchOptimizedModule(critic, cfg.train, role="critic"), rank=rank, world_size=world_size)
    return step, gen, mixture


def batches(mixture):
    data = torch.Generator().manual_seed(1)
    while True:
        yield Batch(mixture.sample(16, generator=data))


def run_inline(overrides=None, steps=STEPS):
    step_fn, _, mixture = make_step(overrides)
    return [step_fn(batch, s) for s, batch in zip(range(steps), batches(mixture))]


def run_pool(overrides=None, steps=STEPS, kill_at=None, compare_inputs=False):
    """The training loop with the pool: start, attach, step, after_step, close."""
    step_fn, gen, mixture = make_step(overrides)
    pool = RolloutPool.create(step_fn.cfg, BUILD, rank=0, world_size=1, device="cpu")
    history, input_errors = [], []
    try:
        pool.start(0, gen.state_dict)
        for s, batch in zip(range(steps), pool.attach(batches(mixture), 0)):
            if compare_inputs:  # what DMD2Step simulates inline with the trainer's current weights
                x_ref, t_ref = step_fn.generator_input(dataclasses.replace(batch, generator_input=None), s)
                x_in, t_in = batch.generator_input
                assert torch.equal(t_in, t_ref)
                input_errors.append(float((x_in - x_ref).abs().max()))
            history.append(step_fn(batch, s))
            pool.after_step(s, gen.state_dict)
            if s == kill_at:
                ray.kill(pool.actors[0])
        loaded = ray.get(pool.actors[-1].loaded_version.remote())
        return {"history": history, "stats": pool.stats(), "served": list(pool.served),
                "input_errors": input_errors, "loaded": loaded}
    finally:
        pool.close()


def assert_same_history(a, b):
    assert len(a) == len(b)
    for s, (ma, mb) in enumerate(zip(a, b)):
        assert ma.keys() == mb.keys(), s
        got = torch.tensor([ma[k] for k in sorted(ma)], dtype=torch.float64)
        want = torch.tensor([mb[k] for k in sorted(mb)], dtype=torch.float64)
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7), (s, ma, mb)


@pytest.fixture(scope="module")
def inline_history():
    return run_inline()


@pytest.fixture(scope="module")
def pooled(ray_local):
    return run_pool(compare_inputs=True)


def test_version_at_counts_completed_generator_updates():
    # ttur 2: updates at steps 0, 2, 4, ...; before step s, ceil(s / 2) of them are done.
    assert [version_at(s, 2, 1) for s in range(7)] == [0, 1, 1, 2, 2, 3, 3]
    assert [version_at(s, 1, 1) for s in range(4)] == [0, 1, 2, 3]
    assert [version_at(s, 2, 2) for s in range(9)] == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert [publishes_after(s, 2, 1) for s in range(6)] == [True, False, True, False, True, False]
    assert [publishes_after(s, 2, 2) for s in range(8)] == [False, False, True, False, False, False, True, False]
    # A publish after `step` is exactly what moves the version between step and step + 1.
    for r in (1, 2, 3, 5):
        for every in (1, 2, 3):
            for s in range(40):
                moved = version_at(s + 1, r, every) != version_at(s, r, every)
                assert publishes_after(s, r, every) == moved, (r, every, s)


@pytest.mark.parametrize("rank,world_size,precision", [(0, 1, "no"), (1, 2, "no"), (1, 2, "bf16")])
def test_rollout_is_the_inline_input_for_any_rank_and_precision(rank, world_size, precision):
    # What an actor runs (in process here): this rank's rows of the iteration's noise, and
    # DMD2Step's autocast, for every k.
    step_fn, gen, mixture = make_step({"train.mixed_precision": precision}, rank, world_size)
    batch = Batch(mixture.sample(16))
    ks = set()
    for s in range(8):
        request = RolloutRequest(s, (16, 2), torch.float32, None, rank, world_size)
        rollout = simulate_rollout(gen, BASE["generator.timesteps"], 0, precision, request, torch.device("cpu"), 0)
        x_ref, t_ref = step_fn.generator_input(batch, s)
        assert torch.equal(rollout.x_in, x_ref) and torch.equal(rollout.t_in, t_ref)
        assert rollout.t == int(t_ref[0])
        ks.add(rollout.k)
    assert len(ks) > 1


def test_weight_store_waits_for_the_version_asked_for(ray_local):
    store = WeightStore.remote()
    ray.get(store.publish.remote(0, [ray.put({"w": torch.zeros(1)})]))
    waiting = store.latest.remote(1)  # what a rank other than 0 asks before rank 0 published
    ready, _ = ray.wait([waiting], timeout=0.5)
    assert not ready
    ray.get(store.publish.remote(1, [ray.put({"w": torch.ones(1)})]))
    version, refs = ray.get(waiting)
    assert version == 1 and torch.equal(ray.get(refs[0])["w"], torch.ones(1))  # a ref, not resolved
    ray.get(store.publish.remote(0, [ray.put({"w": torch.zeros(1)})]))  # older: ignored
    assert ray.get(store.latest.remote(0))[0] == 1
    ray.kill(store)


def test_actor_rollouts_reproduce_inline_training(pooled, inline_history):
    served = pooled["served"]
    assert any(r.k > 0 and not r.local for r in served)  # the actor did simulate
    assert any(r.local for r in served)  # k = 0 stayed in the client
    # The actor's input is DMD2Step's inline input for the same step and weights (bitwise here;
    # the margin allows for another process's thread count reordering float sums)...
    assert len(pooled["input_errors"]) == STEPS
    assert max(pooled["input_errors"]) <= 1e-6
    # ...so the whole run follows the inline one.
    assert_same_history(pooled["history"], inline_history)


def test_published_weights_reach_the_actors(pooled):
    from_actors = [r for r in pooled["served"] if not r.local]
    versions = [r.version for r in from_actors]
    assert versions == sorted(versions) and versions[-1] > versions[0]
    # max_staleness 0: every rollout was made with the weights the trainer held at its step.
    assert all(r.version == version_at(r.step, 2, 1) for r in from_actors)
    assert pooled["stats"]["version"] == version_at(STEPS, 2, 1)
    assert pooled["loaded"] == versions[-1]


@pytest.mark.parametrize("max_staleness", [0, 10])
def test_stale_rollouts_are_dropped_and_redone(ray_local, max_staleness):
    # ttur 1: a new version every iteration, so rollouts requested 3 iterations ahead are stale.
    result = run_pool({"train.ttur_ratio": 1, "rollout.lookahead": 3, "rollout.max_staleness": max_staleness},
                      steps=8)
    stats, from_actors = result["stats"], [r for r in result["served"] if not r.local]
    assert len(result["history"]) == 8 and from_actors
    if max_staleness == 0:
        assert stats["dropped_stale"] > 0
        assert all(r.staleness == 0 for r in from_actors) and stats["max_staleness"] == 0
    else:
        assert stats["dropped_stale"] == 0
        assert any(r.staleness > 0 for r in from_actors)
        assert stats["max_staleness"] <= max_staleness


def test_dead_actor_is_replaced_and_training_goes_on(ray_local, inline_history):
    result = run_pool({"rollout.num_actors": 2}, kill_at=3)
    assert result["stats"]["actors_replaced"] >= 1
    assert len(result["history"]) == STEPS
    # The replacement loads the published weights: the run still follows the inline one.
    assert_same_history(result["history"], inline_history)
