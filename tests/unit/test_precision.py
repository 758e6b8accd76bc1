"""bf16 training as the DMD2 authors run it: fp32 weights under bf16 autocast, a bf16 frozen
teacher, the DM loss's fake-score pass in fp32, x0 conversions in float64.

On the tiny random-weight sd15 UNet (dmdscale.families.sd.tiny), at t = 980 (1/sqrt(abar) ~ 13).
"""
from __future__ import annotations

import collections
import copy

import pytest
import torch
from conftest import text_cfg

from dmdscale.core.losses import dm_loss
from dmdscale.core.optim import TorchOptimizedModule
from dmdscale.core.precision import autocast
from dmdscale.core.step import Batch, DMD2Step
from dmdscale.distributed.worker import build_players
from dmdscale.families.sd.model import load_sd_teacher
from dmdscale.models.text_encoders import PromptEncoder
from dmdscale.families import resolve

PROMPTS = ["a cat", "a dog", "digit 3", "a red car"]
HIGH_T = 980
# Relative error of the DM gradient against the float64 reference, measured on this model
# (4 samples, 16x16 latents, fake score = teacher + 1% weight noise): fp32 fake-score pass
# about 1e-5, bf16 pass (bf16 weights under autocast, the old path) about 1e-1.
FP32_TOLERANCE = 1e-4
BF16_AT_LEAST = 1e-2


def dm_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """What dm_loss sends into the generator: d loss / dx x numel = (p_real - p_fake) / normaliser."""
    x = x.detach().requires_grad_(True)
    grad, = torch.autograd.grad(dm_loss(x, x0_real, x0_fake), x)
    return grad.double() * x.numel()


def relative_error(a: torch.Tensor, reference: torch.Tensor) -> float:
    return float((a - reference).norm() / reference.norm())


def x0_in_float64(model, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """The reference: the network and the eps -> x0 conversion in float64, without dmdscale's to_x0."""
    net = copy.deepcopy(model).cast_network(torch.float64)
    with torch.no_grad():
        eps = net.predict(x_t.double(), t, {k: v.double() for k, v in cond.items()})
    abar = model.schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    return (x_t.double() - (1 - abar).sqrt() * eps) / abar.sqrt()


def bf16_players(tiny):
    cfg = text_cfg("sd15", tiny["sd15"], **{"train.mixed_precision": "bf16", "loss.guidance_scale": 1.75})
    return cfg, *build_players(cfg, resolve(cfg), tiny["sd15"], torch.device("cpu"))


def test_players_start_from_fp32_weights_and_only_the_teacher_is_bf16(tiny):
    cfg, teacher, generator, critic = bf16_players(tiny)
    fp32 = load_sd_teacher(tiny["sd15"], "sd15", torch.float32).state_dict()
    for player in (generator, critic.fake_score):  # copied before the teacher was cast: not bf16-rounded
        state = player.state_dict()
        assert all(state[k].dtype == torch.float32 and torch.equal(state[k], v) for k, v in fp32.items())
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert teacher.schedule.alphas_cumprod.dtype == torch.float64  # cast_network leaves the schedule alone
    plain = build_players(text_cfg("sd15", tiny["sd15"]), resolve(text_cfg("sd15", tiny["sd15"])), tiny["sd15"], torch.device("cpu"))
    assert {p.dtype for player in plain for p in player.parameters()} == {torch.float32}  # "no": unchanged


def test_dm_gradient_at_high_t_keeps_fp32_accuracy_where_bf16_loses_it(tiny):
    """The step's DM-loss score passes (`DMD2Step.dm_scores`) against a float64 fake score, with
    the teacher's output shared: both paths keep the authors' bf16 teacher, so what differs is
    the fake-score pass. Late in training x0_fake - x0_real is small; here the fake score is the
    teacher with 1% weight noise, so the signal is ~3% of x0 and a bf16 pass's error, amplified
    ~13x by the conversion, is a sizeable part of it."""
    cfg, teacher, generator, critic = bf16_players(tiny)
    fake = critic.fake_score
    generator_noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(0.01 * p.std().nan_to_num(0) * torch.randn(p.shape, generator=generator_noise))
    step = DMD2Step(cfg, teacher, TorchOptimizedModule(generator, cfg.train, role="generator"),
                    TorchOptimizedModule(critic, cfg.train, role="critic"))
    torch.manual_seed(0)
    cond = PromptEncoder.load(tiny["sd15"], "sd15").encode(PROMPTS)
    x = torch.randn(len(PROMPTS), 4, 16, 16)
    t = torch.full((len(x),), HIGH_T)
    assert float(teacher.schedule.alphas_cumprod[HIGH_T].rsqrt()) > 12  # the amplification at stake
    x_t = teacher.schedule.add_noise(x, torch.randn_like(x), t)

    x0_real, x0_fake = step.dm_scores(x_t, t, cond)
    reference = dm_gradient(x, x0_real, x0_in_float64(fake, x_t, t, cond))
    old_fake = copy.deepcopy(fake).cast_network(torch.bfloat16)  # DeepSpeed's former bf16 engine
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        x0_fake_bf16 = old_fake(x_t, t, cond)
    chosen_error = relative_error(dm_gradient(x, x0_real, x0_fake), reference)
    old_error = relative_error(dm_gradient(x, x0_real, x0_fake_bf16), reference)
    print(f"DM gradient relative error at t={HIGH_T}: fp32 fake pass {chosen_error:.2e}, bf16 {old_error:.2e}")
    assert chosen_error < FP32_TOLERANCE
    assert old_error > BF16_AT_LEAST


@pytest.mark.slow
def test_bf16_deepspeed_engines_keep_fp32_states_and_train_under_autocast(tiny):
    """Real DeepSpeed (ZeRO-2, gloo): the engines keep fp32 parameters and Adam moments; the
    generator's and critic's training forwards run in bf16 (autocast), the DM-loss fake-score
    pass in fp32, the teacher in bf16."""
    from dmdscale.distributed.engine import DeepSpeedOptimizedModule

    cfg = text_cfg("sd15", tiny["sd15"], **{"train.mixed_precision": "bf16", "scale.zero_stage": 2,
                                            "train.batch_size": 2, "train.lr": 1e-3})
    teacher, generator, critic = build_players(cfg, resolve(cfg), tiny["sd15"], torch.device("cpu"))
    engines = {name: DeepSpeedOptimizedModule(module, cfg.train, cfg.scale, 2, role=name)
               for name, module in (("generator", generator), ("critic", critic))}
    outputs = collections.defaultdict(set)  # dtypes each UNet's last conv produced
    for name, model in (("teacher", teacher), ("generator", generator), ("fake_score", critic.fake_score)):
        model.unet.conv_out.register_forward_hook(lambda m, i, out, name=name: outputs[name].add(out.dtype))
    before = {n: p.detach().clone() for n, p in generator.named_parameters()}
    step = DMD2Step(cfg, teacher, engines["generator"], engines["critic"])
    batch = Batch(torch.randn(2, 4, 16, 16), PromptEncoder.load(tiny["sd15"], "sd15").encode(PROMPTS[:2]))
    metrics = step(batch, 0)  # a generator turn, then a critic turn

    assert metrics["generator_updated"] == 1 and metrics["nonfinite_generator"] == metrics["nonfinite_critic"] == 0
    assert any(not torch.equal(before[n], p) for n, p in generator.named_parameters())
    for engine in engines.values():
        assert not engine.engine.bfloat16_enabled()
        assert {p.dtype for p in engine.module.parameters()} == {torch.float32}
        moments = [s[k] for s in engine.engine.optimizer.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
        assert moments and {m.dtype for m in moments} == {torch.float32}
    assert outputs["generator"] == {torch.bfloat16} and outputs["teacher"] == {torch.bfloat16}
    assert outputs["fake_score"] == {torch.float32, torch.bfloat16}  # DM-loss pass; denoising loss under autocast


@pytest.mark.parametrize("mixed_precision, dtype", [("bf16", torch.bfloat16), ("no", torch.float32)])
def test_autocast_runs_matmuls_in_bf16_only_under_bf16(mixed_precision, dtype):
    """The one context of every forward (step, regression, rollouts, ODE pairs): fp32 weights,
    bf16 matmuls under train.mixed_precision bf16, fp32 ones otherwise; the weights stay fp32."""
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    with autocast(torch.device("cpu"), mixed_precision):
        assert torch.matmul(x, x.T).dtype == dtype
        assert layer(x).dtype == dtype
    assert layer.weight.dtype == torch.float32
    assert torch.matmul(x, x.T).dtype == torch.float32  # nothing left on after the block
