"""DeepSpeed engines behind the step's interface (one process, gloo on CPU), the weights-only
loader's fail-closed install, and resource planning."""
import os
import pickle
import re
import types

import deepspeed
import pytest
import torch

from dmdscale.config import ConfigError, build_config
from dmdscale.core.schedule import NoiseSchedule
from dmdscale.core.step import Batch, DMD2Step
from dmdscale.distributed.engine import DeepSpeedOptimizedModule, deepspeed_config, load_weights_only
from dmdscale.distributed.resources import worker_resources
from dmdscale.core.networks import Critic
from dmdscale.models.heads import MLPHead
from dmdscale.families.toy2d.model import GaussianMixture2D, MixtureDenoiser, MLPDenoiser
from dmdscale.families import resolve


def test_deepspeed_config_carries_the_paper_optimizer_settings():
    cfg = build_config({}, {"scale.zero_stage": 3, "scale.offload_optimizer": True, "train.mixed_precision": "bf16"})
    ds = deepspeed_config(cfg.train, cfg.scale, micro_batch=8, role="critic")
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["betas"] == [0.9, 0.999]
    assert ds["optimizer"]["params"]["weight_decay"] == 0.01 and ds["optimizer"]["params"]["torch_adam"]
    assert ds["gradient_clipping"] == 10.0
    assert not ds["bf16"]["enabled"]  # fp32 engines: bf16 is the step's autocast (tests/unit/test_precision.py)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "scheduler" not in ds  # the warm-up is the client scheduler, shared with the plain path


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_shard_teacher_is_refused_below_zero3_before_any_work(stage):
    """Only ZeRO-3 partitions parameters: scale.shard_teacher with another stage is a config error."""
    with pytest.raises(ConfigError, match=r"scale\.shard_teacher.*needs scale\.zero_stage 3 \(got %d\)" % stage):
        build_config({}, {"scale.shard_teacher": True, "scale.zero_stage": stage})
    assert build_config({}, {"scale.shard_teacher": True, "scale.zero_stage": 3}).scale.shard_teacher
    assert not build_config({}).scale.shard_teacher  # off by default: the teacher whole on every rank


@pytest.mark.parametrize("workers, data_cpus, cpus, expected", [
    (1, 1.0, 2, 1.0),   # 2-CPU laptop: one CPU for the worker, one for Ray Data
    (2, 1.0, 2, 0.5),   # two workers share what data leaves
    (2, 1.0, 16, 1.0),
])
def test_plan_resources_always_leaves_cpus_for_data(workers, data_cpus, cpus, expected):
    cfg = build_config({}, {"scale.num_workers": workers, "scale.data_cpus": data_cpus, "eval.during_training": False})
    planned = worker_resources(cfg, resolve(cfg), cpus)
    assert planned == {"CPU": expected}
    assert cpus - workers * planned["CPU"] >= data_cpus


def test_plan_resources_rejects_an_impossible_plan():
    cfg = build_config({}, {"scale.num_workers": 2, "scale.data_cpus": 2.0, "eval.during_training": False})
    with pytest.raises(ValueError, match="scale.num_workers"):
        worker_resources(cfg, resolve(cfg), 2)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_dmd2_step_runs_on_deepspeed_zero(stage):
    """Two engines in one process, the GAN term through the critic inside the generator's
    backward (the known ZeRO-3 hazard): the TTUR schedule holds and losses stay finite. A
    2-step student with a step-conditioned critic: its embedding is read inside the fake
    score's forward hook, which ZeRO-3 must gather too."""
    cfg = build_config({}, {"train.batch_size": 16, "train.ttur_ratio": 2, "scale.zero_stage": stage,
                            "loss.gan_generator_weight": 0.1, "loss.gan_critic_weight": 0.1,
                            "generator.timesteps": [999, 499], "loss.step_conditioned_critic": True})
    torch.manual_seed(0)
    sched, mixture = NoiseSchedule.ddpm(), GaussianMixture2D()
    gen = DeepSpeedOptimizedModule(MLPDenoiser(sched, 2, 16, 2), cfg.train, cfg.scale, 16, role="generator")
    critic = DeepSpeedOptimizedModule(Critic(MLPDenoiser(sched, 2, 16, 2), MLPHead(16, 16), 2), cfg.train, cfg.scale, 16, role="critic")
    step = DMD2Step(cfg, MixtureDenoiser(mixture, sched), gen, critic)
    for i in range(4):
        m = step(Batch(mixture.sample(16)), i)
        assert m["generator_updated"] == float(i % 2 == 0)
        assert all(torch.isfinite(torch.tensor(v)) for v in m.values())
        assert m["nonfinite_critic"] == 0
    weight = critic.module.step_embedding.weight
    with deepspeed.zero.GatheredParameters([weight]):  # a no-op below ZeRO-3
        assert torch.count_nonzero(weight) > 0  # trained through the hook


@pytest.mark.slow
def test_deepspeed_engine_follows_the_plain_optimizer_through_the_warm_up():
    """Same AdamW, warm-up and clipping: a ZeRO-2 engine and the plain path take the same steps
    (DeepSpeed's own WarmupLR would leave the first two updates at learning rate 0)."""
    from dmdscale.core.optim import TorchOptimizedModule

    cfg = build_config({}, {"train.warmup_steps": 3, "train.lr": 1e-2, "scale.zero_stage": 2})
    sched = NoiseSchedule.ddpm()
    torch.manual_seed(0)
    plain_model = MLPDenoiser(sched, 2, 16, 2)
    ds_model = MLPDenoiser(sched, 2, 16, 2)
    ds_model.load_state_dict(plain_model.state_dict())
    plain = TorchOptimizedModule(plain_model, cfg.train, role="generator")
    engine = DeepSpeedOptimizedModule(ds_model, cfg.train, cfg.scale, 8, role="generator")
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, t = torch.randn(8, 2, generator=g), torch.randint(0, 1000, (8,), generator=g)
        for opt in (plain, engine):
            opt.backward(opt.module(x, t, None).pow(2).mean())
            opt.step()
        for a, b in zip(plain_model.parameters(), engine.module.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.slow
def test_pickled_code_is_refused_even_where_deepspeed_reads_around_the_safe_loader(tmp_path, monkeypatch):
    """The engine is built with the weights-only loader installed and restores its own
    checkpoint through it; with DeepSpeed's own (weights_only=False) loader put back, as a
    later version's new read path would, the net around `load` still refuses the model-states
    file's payload instead of running it."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    cfg = build_config({}, {"scale.zero_stage": 2})
    a = DeepSpeedOptimizedModule(MLPDenoiser(NoiseSchedule.ddpm(), 2, 16, 2), cfg.train, cfg.scale, 8, role="generator")
    assert a.engine.checkpoint_engine.load is load_weights_only
    a.save(tmp_path, "generator")
    a.load(tmp_path, "generator")
    torch.save({"payload": _RunsCode()}, tmp_path / "generator" / "mp_rank_00_model_states.pt")
    unsafe = TorchCheckpointEngine.load.__get__(a.engine.checkpoint_engine)
    monkeypatch.setattr(a.engine.checkpoint_engine, "load", unsafe)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        a.load(tmp_path, "generator")
    assert not (tmp_path / "pwned").exists()
    assert torch.load is torch.serialization.load  # the net is lifted afterwards


class _ReadOnlyLoad:
    load = property(lambda self: lambda *a, **k: None)


@pytest.mark.parametrize("engine_attrs, reason", [
    ({}, "no checkpoint_engine"),
    ({"checkpoint_engine": _ReadOnlyLoad()}, "_ReadOnlyLoad.load could not be replaced"),
    ({"checkpoint_engine": types.SimpleNamespace(), "load_universal_checkpoint": lambda: True}, "universal"),
])
def test_engine_creation_fails_closed_when_the_safe_loader_cannot_be_installed(monkeypatch, engine_attrs, reason):
    import deepspeed

    def fake_initialize(model, **_):
        attrs = {"module": model, "load_universal_checkpoint": lambda: False, **engine_attrs}
        return types.SimpleNamespace(**attrs), None, None, None

    monkeypatch.setattr(deepspeed, "initialize", fake_initialize)
    cfg = build_config({}, {})
    expected = rf"^DeepSpeed {re.escape(deepspeed.__version__)}: the weights-only checkpoint loader .*{reason}"
    with pytest.raises(RuntimeError, match=expected):
        DeepSpeedOptimizedModule(MLPDenoiser(NoiseSchedule.ddpm(), 2, 16, 2), cfg.train, cfg.scale, 8, role="generator")
