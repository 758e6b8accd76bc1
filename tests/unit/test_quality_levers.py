"""DMD2's quality levers (issue 13): GAN noise levels, the calibrated GAN weight and its
diagnostics, the warm-up on the iteration clock, a separate critic LR, generator EMA, and staged
runs (`train.init`)."""
import copy

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from dmdscale.config import ConfigError, build_config
from dmdscale.core.ema import GeneratorEMA, ema_name, unreached_decays, updates_to_reach
from dmdscale.core.losses import dm_loss, gan_generator_loss
from dmdscale.core.optim import TorchOptimizedModule, decay_factor, warmup_factor
from dmdscale.core.schedule import NoiseSchedule, TimestepSampler
from dmdscale.core.step import Batch, DMD2Step, by_noise_level
from dmdscale.distributed.checkpoint.stages import init_source, load_stage, save_stage
from dmdscale.eval.plots import plot_diagnostics
from dmdscale.core.networks import Critic
from dmdscale.models.heads import MLPHead
from dmdscale.families.toy2d.model import GaussianMixture2D, MixtureDenoiser, MLPDenoiser
from dmdscale.families import resolve


def make_step(overrides=None):
    cfg = build_config({}, {"train.batch_size": 32, "train.warmup_steps": 0, "train.lr": 1e-3,
                            "train.ttur_ratio": 1, **(overrides or {})})
    torch.manual_seed(0)
    sched = NoiseSchedule.ddpm()
    mixture = GaussianMixture2D()
    gen = MLPDenoiser(sched, 2, 16, 2)
    critic = Critic(MLPDenoiser(sched, 2, 16, 2), MLPHead(16, 16))
    step = DMD2Step(cfg, MixtureDenoiser(mixture, sched), TorchOptimizedModule(gen, cfg.train, role="generator"),
                    TorchOptimizedModule(critic, cfg.train, role="critic"))
    return step, gen, critic, mixture


# -- noise levels ---------------------------------------------------------------------------
def test_karras_sampler_puts_a_quarter_of_draws_at_low_noise_on_a_linear_schedule():
    sched = NoiseSchedule.ddpm()
    draws = {kind: TimestepSampler(sched, kind).draw(0, 999, 20000, lambda high, n: torch.randint(high, (n,)))
             for kind in ("uniform", "karras")}
    low = {kind: float((sched.sigmas[t] < 0.17).float().mean()) for kind, t in draws.items()}
    assert 0.22 < low["karras"] < 0.28 and 0.03 < low["uniform"] < 0.07  # the authors' 25% vs VP-uniform's 5%
    capped = TimestepSampler(sched, "karras").draw(0, 250, 5000, lambda high, n: torch.randint(high, (n,)))
    assert int(capped.max()) <= 250 and int(capped.min()) == 0
    assert TimestepSampler(sched, "karras").within(500, 500).tolist() != []  # a range between grid points


def test_gan_input_is_the_clean_image_at_cap_zero_and_noised_below_the_cap_otherwise():
    step, _, _, mixture = make_step({"loss.gan_max_step": 0})
    x = mixture.sample(32)
    x_in, t = step.gan_input(x)
    assert torch.equal(x_in, x) and int(t.max()) == 0
    step, _, _, _ = make_step({"loss.gan_max_step": 100})
    x_in, t = step.gan_input(x)
    assert int(t.max()) <= 100 and not torch.equal(x_in, x)


# -- the GAN weight and its diagnostics -------------------------------------------------------
def test_split_gradients_equal_the_direct_loss_gradient():
    """The generator's backward from d DM/dx + w d GAN/dx is the gradient of dm + w * gan."""
    overrides = {"loss.gan_generator_weight": 0.3, "loss.gan_critic_weight": 0.1}
    step, gen, critic, mixture = make_step(overrides)
    for i in range(3):  # let the fake score and critic move away from their init
        step(Batch(mixture.sample(32)), i)
    x_in, t_in = step.generator_input(Batch(mixture.sample(32)), 3)
    rng_state = step.rng.get_state()
    grads = []
    for split in (True, False):
        step.rng.set_state(rng_state)
        gen.zero_grad()
        x = gen(x_in, t_in)
        t = step.dm_timesteps.draw(20, 980, 32, step._randindex)
        x_t = step.schedule.add_noise(x.detach(), step._randn(x), t)
        with torch.no_grad():
            x0_real, x0_fake = step.teacher(x_t, t), critic.fake_score(x_t, t)
        losses = {"loss_dm": dm_loss(x, x0_real, x0_fake)}
        x_gan, t_gan = step.gan_input(x)
        losses["loss_gan_generator"] = gan_generator_loss(critic(x_gan, t_gan))
        if split:
            objective, weight, norms = step._gan_generator_objective(x, losses)
            assert weight == 0.3 and norms["grad_norm_gan_x"] > 0 and norms["grad_norm_dm_x"] > 0
        else:
            objective = losses["loss_dm"] + 0.3 * losses["loss_gan_generator"]
        objective.backward()
        grads.append(torch.cat([p.grad.flatten() for p in gen.parameters()]).clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


def test_calibrated_gan_weight_holds_the_gradient_norm_ratio():
    step, _, _, mixture = make_step({"loss.gan_grad_ratio": 0.25, "loss.gan_critic_weight": 0.1,
                                     "train.log_every": 2})
    seen = []
    for i in range(6):
        m = step(Batch(mixture.sample(32)), i)
        if m["grad_norm_dm_x"] > 0:
            seen.append(m)
            assert m["grad_norm_gan_x"] == pytest.approx(0.25 * m["grad_norm_dm_x"], rel=1e-5)
            assert m["gan_weight"] > 0
        if i % 2 == 0:  # log steps carry the by-noise-level diagnostics
            assert any(k.startswith("diag_x0_gap_sigma_") for k in m)
            assert any(k.startswith("diag_d_real_sigma_") for k in m) and any(k.startswith("diag_d_fake_") for k in m)
        else:
            assert not any(k.startswith("diag_") for k in m)
    assert len(seen) >= 4
    weights = {round(m["gan_weight"], 8) for m in seen}
    assert len(weights) > 1  # recomputed every update, not a constant


def test_noise_level_buckets_average_their_samples_only():
    out = by_noise_level("gap", torch.tensor([1.0, 3.0, 10.0]), torch.tensor([0.05, 0.07, 5.0], dtype=torch.float64))
    assert out == {"gap_sigma_0-0.1": 2.0, "gap_sigma_2-inf": 10.0}


def test_diagnostics_png_is_drawn_from_the_log(tmp_path):
    log = [{"step": s, "diag_x0_gap_sigma_0-0.1": 0.1 * s, "diag_d_real_sigma_0-0.1": 0.6,
            "diag_d_fake_sigma_0-0.1": 0.4, "grad_norm_dm_x": 1.0, "grad_norm_gan_x": 0.3,
            "grad_norm_generator": 5.0} for s in range(0, 50, 10)]
    path = plot_diagnostics(log, tmp_path / "diagnostics.png")
    assert path is not None and path.stat().st_size > 10_000
    assert plot_diagnostics([{"step": 0, "loss_dm": 1.0}], tmp_path / "none.png") is None


# -- optimizers -------------------------------------------------------------------------------
def test_generator_warm_up_runs_on_the_iteration_clock():
    # ratio 5, warm-up 20 iterations: the generator's update 4 happens at iteration 20 -> full LR.
    assert warmup_factor(4, 20, iterations_per_update=5) == 1.0
    assert warmup_factor(1, 20, iterations_per_update=5) == pytest.approx(6 / 20)
    cfg = build_config({}, {"train.ttur_ratio": 5, "train.warmup_steps": 20, "train.lr": 1e-3,
                            "train.critic_lr": 4e-3})
    gen = TorchOptimizedModule(torch.nn.Linear(2, 2), cfg.train, role="generator")
    critic = TorchOptimizedModule(torch.nn.Linear(2, 2), cfg.train, role="critic")
    for opt in (gen, critic):
        for _ in range(4):
            opt.module(torch.randn(3, 2)).sum().backward()
            opt.step()
    assert gen.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # 4 updates = 20 iterations
    assert critic.optimizer.param_groups[0]["lr"] == pytest.approx(4e-3 * 5 / 20)  # its own LR, 5 of 20


def test_cosine_decay_reaches_zero_at_max_steps_for_both_players_on_the_iteration_clock():
    cfg = build_config({}, {"train.ttur_ratio": 5, "train.warmup_steps": 0, "train.lr": 1e-3,
                            "train.max_steps": 40, "train.lr_decay": "cosine"})
    assert decay_factor(20, 40, "cosine") == pytest.approx(0.5)
    assert decay_factor(40, 40, "cosine") == pytest.approx(0.0)
    assert decay_factor(20, 40, "constant") == 1.0
    gen = TorchOptimizedModule(torch.nn.Linear(2, 2), cfg.train, role="generator")
    critic = TorchOptimizedModule(torch.nn.Linear(2, 2), cfg.train, role="critic")
    for opt, updates in ((gen, 4), (critic, 20)):  # both at iteration 20 of 40: half the rate
        for _ in range(updates):
            opt.module(torch.randn(3, 2)).sum().backward()
            opt.step()
        assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)
    with pytest.raises(ValueError, match="lr_decay"):
        build_config({}, {"train.lr_decay": "linear"})


# -- EMA --------------------------------------------------------------------------------------
def test_ema_warms_up_swaps_in_and_round_trips():
    net = torch.nn.Linear(3, 1)
    ema = GeneratorEMA(net, [0.9, 0.99])
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()  # update 0: decay min(0.9, 1/10) = 0.1 -> 90% of the new weights
    torch.testing.assert_close(ema.averages[0.9][0], 0.1 * start + 0.9 * (start + 1))
    trained = net.weight.detach().clone()
    with ema.swapped_in(0.99) as model:
        torch.testing.assert_close(model.weight, ema.averages[0.99][0])
    assert torch.equal(net.weight, trained)  # its own weights are back
    state = ema.state_dict()
    assert f"{ema_name(0.9)}/weight" in state and int(state["updates"]) == 1
    other = GeneratorEMA(copy.deepcopy(net), [0.9, 0.99])
    other.load_state_dict(state)
    assert other.updates == 1 and torch.equal(other.averages[0.9][0], ema.averages[0.9][0])
    with pytest.raises(KeyError, match="ema_0.5"):
        GeneratorEMA(net, [0.5]).load_state_dict(state)
    assert GeneratorEMA(net, [0.5, 0.9]).load_state_dict(state, strict=False) == [0.9]


def test_decays_the_warm_up_never_reaches_give_the_same_average():
    # 0.97 needs 290 updates and 0.985 needs 590: in a 100-update run (the demo's 500
    # iterations at TTUR 5) both follow the warm-up throughout; 0.9 (80 updates) does not.
    assert (updates_to_reach(0.9), updates_to_reach(0.97)) == (80, 290)
    assert unreached_decays([0.9, 0.97, 0.985], 100) == [0.97, 0.985]
    assert unreached_decays([0.97], 291) == []
    net = torch.nn.Linear(3, 1)
    ema = GeneratorEMA(net, [0.9, 0.97, 0.985])
    for _ in range(100):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        ema.update()
    assert torch.equal(ema.averages[0.97][0], ema.averages[0.985][0])
    assert not torch.equal(ema.averages[0.9][0], ema.averages[0.97][0])
    assert updates_to_reach(0.97, power=3) == 131 and unreached_decays([0.97], 132, power=3) == []


def test_the_driver_names_decays_a_run_never_reaches(capsys):
    from dmdscale.driver import _note_unreached_decays

    run = {"model.family": "unet2d", "model.teacher": "train", "train.max_steps": 500, "train.ttur_ratio": 5}
    _note_unreached_decays(build_config({}, {**run, "train.ema_decays": [0.9, 0.97]}))
    out = capsys.readouterr().out
    assert "100 generator updates" in out and "0.97 after 290" in out and "0.9 after" not in out
    _note_unreached_decays(build_config({}, {**run, "train.ema_decays": [0.97], "train.ema_power": 3}))
    assert capsys.readouterr().out == ""  # the power profile is the choice; its cap may wait


def test_power_ema_weighs_update_j_as_j_to_the_power():
    net = torch.nn.Linear(1, 1, bias=False)
    emas = {p: GeneratorEMA(net, [0.9999], power=p) for p in (0.0, 2.0)}
    capped = GeneratorEMA(net, [0.5], power=2.0)
    for j in range(1, 21):  # update j leaves the weight at j
        with torch.no_grad():
            net.weight.fill_(float(j))
        for ema in [*emas.values(), capped]:
            ema.update()
    # Update j's weight is j^(p+1) - (j-1)^(p+1), about (p+1) j^p: the product of the later decays.
    mean_of = lambda p: sum((j ** (p + 1) - (j - 1) ** (p + 1)) * j for j in range(1, 21)) / 20 ** (p + 1)  # noqa: E731
    assert emas[0.0].averages[0.9999][0].item() == pytest.approx(mean_of(0), rel=1e-6)  # power 0: the plain mean
    assert emas[2.0].averages[0.9999][0].item() == pytest.approx(mean_of(2), rel=1e-6)
    # The cap still holds: a decay of 0.5 keeps only the last few updates.
    assert capped.averages[0.5][0].item() == pytest.approx(20 - 1, abs=0.01)


def test_ema_and_gan_config_is_checked():
    digits = {"model.family": "unet2d", "model.teacher": "train"}
    with pytest.raises(ConfigError, match="export.ema"):
        build_config({}, {**digits, "train.ema_decays": [0.9], "export.ema": 0.99})
    with pytest.raises(ConfigError, match="ema_decays"):
        build_config({}, {**digits, "train.ema_decays": [1.5]})
    with pytest.raises(ConfigError, match="train.ema_power"):
        build_config({}, {**digits, "train.ema_power": 3})
    with pytest.raises(ConfigError, match="zero_stage"):
        build_config({}, {**digits, "train.ema_decays": [0.9], "scale.zero_stage": 3})
    with pytest.raises(ConfigError, match="loss.gan_augment"):
        build_config({}, {**digits, "loss.gan_augment": ["rotate"]})
    with pytest.raises(ConfigError, match="toy2d"):  # points have no image augmentation or conv head
        resolve(build_config({}, {"loss.gan_augment": ["shift"]}))


def test_step_updates_the_ema_after_each_generator_update():
    step, gen, critic, mixture = make_step({"train.ttur_ratio": 2})
    step.ema = GeneratorEMA(gen, [0.9])
    for i in range(5):
        step(Batch(mixture.sample(32)), i)
    assert step.ema.updates == 3  # iterations 0, 2, 4


# -- staged runs -----------------------------------------------------------------------------
def _unet_folder(path):
    from dmdscale.families.unet2d.model import tiny_unet_config

    UNet2DModel(**tiny_unet_config(16, 1, 10, 8)).save_pretrained(path / "unet")
    DDPMScheduler(prediction_type="v_prediction").save_pretrained(path / "scheduler")
    return path


def test_init_starts_generator_critic_and_ema_from_another_runs_stage(tmp_path):
    from dmdscale.distributed.worker import build_players, init_ema

    teacher = str(_unet_folder(tmp_path / "teacher"))
    cfg = build_config({}, {"model.family": "unet2d", "model.teacher": teacher, "train.ema_decays": [0.9]})
    _, generator, critic = build_players(cfg, resolve(cfg), teacher, torch.device("cpu"))
    with torch.no_grad():  # "trained" weights
        for p in [*generator.parameters(), *critic.parameters()]:
            p.add_(0.01)
    ema = init_ema(cfg, generator)
    ema.update()
    save_stage(tmp_path / "run1", {"generator": generator.state_dict(), "critic": critic.state_dict(),
                                   "ema": ema.state_dict()})
    assert init_source(tmp_path / "run1") == ("stage", tmp_path / "run1" / "stage")

    stage2 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init": str(tmp_path / "run1"),
                                                                          "ema_decays": [0.9, 0.99]})})
    _, gen2, critic2 = build_players(stage2, resolve(stage2), teacher, torch.device("cpu"))
    for a, b in [(generator, gen2), (critic, critic2)]:
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name
    ema2 = init_ema(stage2, gen2)
    assert ema2.updates == 1 and torch.equal(ema2.averages[0.9][0], ema.averages[0.9][0])

    with pytest.raises(ConfigError, match="train.init"):
        init_source(tmp_path / "missing")
    with pytest.raises(ConfigError, match="neither"):
        init_source(tmp_path / "teacher")


def test_init_ema_starts_the_generator_from_the_first_stages_average(tmp_path):
    """train.init_ema: the generator starts from the stage's EMA (not its raw weights); the
    critic and the EMAs load as before; a wrong decay, an exported student or no train.init is
    refused naming the key, before any work (check_init is what the driver calls)."""
    from dmdscale.distributed.checkpoint.stages import check_init
    from dmdscale.distributed.worker import build_players, init_ema

    teacher = str(_unet_folder(tmp_path / "teacher"))
    cfg = build_config({}, {"model.family": "unet2d", "model.teacher": teacher, "train.ema_decays": [0.9]})
    _, generator, critic = build_players(cfg, resolve(cfg), teacher, torch.device("cpu"))
    ema = init_ema(cfg, generator)
    with torch.no_grad():  # raw weights move away from their average
        for p in generator.parameters():
            p.add_(0.05)
    save_stage(tmp_path / "run1", {"generator": generator.state_dict(), "critic": critic.state_dict(),
                                   "ema": ema.state_dict()})

    stage2 = build_config({}, {"model.family": "unet2d", "model.teacher": teacher, "train.ema_decays": [0.9],
                               "train.init": str(tmp_path / "run1"), "train.init_ema": 0.9})
    check_init(stage2.train.init, stage2.train.init_ema)
    _, gen2, critic2 = build_players(stage2, resolve(stage2), teacher, torch.device("cpu"))
    for (name, p), average in zip(gen2.named_parameters(), ema.averages[0.9]):
        assert torch.equal(p, average), name
    assert not torch.equal(next(gen2.parameters()), next(generator.parameters()))
    for p, q in zip(critic.state_dict().values(), critic2.state_dict().values()):
        assert torch.equal(p, q)

    with pytest.raises(ConfigError, match=r"train.init_ema: .* has no ema_0.99 \(has: \['ema_0.9'\]\)"):
        check_init(tmp_path / "run1", 0.99)
    with pytest.raises(ConfigError, match="train.init_ema: set it only with train.init"):
        check_init(None, 0.9)
    from dmdscale.families.unet2d.export import export_unet_student

    export_unet_student(generator, [999], tmp_path / "run2" / "student")
    with pytest.raises(ConfigError, match="train.init_ema: .* exported student"):
        check_init(tmp_path / "run2", 0.9)
    with pytest.raises(ConfigError, match="train.init_ema"):
        build_config({}, {"train.init_ema": 1.5})


def test_the_regression_stage_starts_from_train_init(tmp_path):
    """The regression stage's generator: the teacher's copy, or train.init's generator (this
    path called the loader with an old signature and failed on the train worker)."""
    from dmdscale.distributed.regression import regression_generator

    teacher = str(_unet_folder(tmp_path / "teacher"))
    cfg = build_config({}, {"model.family": "unet2d", "model.teacher": teacher})
    generator = regression_generator(cfg, resolve(cfg), teacher)
    with torch.no_grad():
        for p in generator.parameters():
            p.mul_(1.5)
    save_stage(tmp_path / "run1", {"generator": generator.state_dict()})
    stage2 = build_config({}, {"model.family": "unet2d", "model.teacher": teacher, "train.init": str(tmp_path / "run1")})
    for p, q in zip(generator.parameters(), regression_generator(stage2, resolve(stage2), teacher).parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(next(generator.parameters()), next(regression_generator(cfg, resolve(cfg), teacher).parameters()))


def test_a_relative_init_path_is_made_absolute_where_the_config_is_read(tmp_path, monkeypatch):
    """Ray's train workers run elsewhere: train.init must reach them as an absolute path."""
    monkeypatch.chdir(tmp_path)
    cfg = build_config({}, {"model.family": "unet2d", "model.teacher": "train", "train.init": "runs/s1"})
    assert cfg.train.init == str(tmp_path / "runs" / "s1")
    assert build_config({}, {}).train.init is None


def test_init_from_an_exported_student_loads_its_unet(tmp_path):
    from dmdscale.distributed.worker import build_players
    from dmdscale.families.unet2d.export import export_unet_student

    teacher = str(_unet_folder(tmp_path / "teacher"))
    cfg = build_config({}, {"model.family": "unet2d", "model.teacher": teacher})
    _, generator, _ = build_players(cfg, resolve(cfg), teacher, torch.device("cpu"))
    with torch.no_grad():
        for p in generator.parameters():
            p.mul_(1.5)
    export_unet_student(generator, [999], tmp_path / "run" / "student")
    assert set(load_stage(tmp_path / "run")) == {"generator"}
    stage2 = build_config({}, {"model.family": "unet2d", "model.teacher": teacher, "train.init": str(tmp_path / "run")})
    _, gen2, _ = build_players(stage2, resolve(stage2), teacher, torch.device("cpu"))
    for p, q in zip(generator.parameters(), gen2.parameters()):
        torch.testing.assert_close(p, q)


def test_full_head_and_augmentation_train_on_a_pixel_unet(tmp_path):
    """The authors' head and DiffAugment in the real step on a (tiny) diffusers UNet: one
    generator and one critic update with finite losses, the head's weights moving."""
    from dmdscale.distributed.worker import build_players
    from dmdscale.models.heads import FullHead

    teacher_path = str(_unet_folder(tmp_path / "teacher"))
    cfg = build_config({}, {"model.family": "unet2d", "model.teacher": teacher_path, "train.batch_size": 8,
                            "train.warmup_steps": 0, "loss.gan_generator_weight": 0.01, "loss.gan_critic_weight": 0.1,
                            "loss.gan_head": "full", "loss.gan_augment": ["shift", "cutout"],
                            "loss.gan_timesteps": "karras", "loss.gan_max_step": 500, "train.log_every": 1})
    teacher, generator, critic = build_players(cfg, resolve(cfg), teacher_path, torch.device("cpu"))
    assert isinstance(critic.head, FullHead)
    step = DMD2Step(cfg, teacher, TorchOptimizedModule(generator, cfg.train, role="generator"),
                    TorchOptimizedModule(critic, cfg.train, role="critic"))
    head_before = [p.detach().clone() for p in critic.head.parameters()]
    m = step(Batch(torch.rand(8, 1, 16, 16) * 2 - 1, torch.arange(8) % 10), 0)
    assert m["nonfinite_generator"] == 0 and m["nonfinite_critic"] == 0
    assert all(k in m for k in ("loss_gan_generator", "loss_gan_critic", "grad_norm_gan_x"))
    assert any(not torch.equal(a, b) for a, b in zip(head_before, critic.head.parameters()))


def test_fid_curves_end_on_the_weights_they_follow():
    """fid.png: the checkpoint evaluations name the raw weights fid_student and the EMA
    fid_student_ema_<d>; the final point must continue each curve with the same weights."""
    from dmdscale.config import build_config
    from dmdscale.driver import _final_point

    cfg = build_config({}, ["train.max_steps=500"])
    final = _final_point(cfg, {"fid_student": 13.7, "fid_student_raw": 15.8, "student_weights": "ema_0.97"})
    assert final == {"step": 500, "fid_student": 15.8, "fid_student_ema_0.97": 13.7}
    assert _final_point(cfg, {"fid_student": 15.0, "student_weights": "raw"}) == {"step": 500, "fid_student": 15.0}


# -- the step-conditioned critic (multi-step students) ---------------------------------------
def test_step_conditioned_critic_trains_only_the_row_of_the_step_it_judged():
    """Each iteration's outputs are judged as step k's: the DM, fake-score and GAN terms all run
    inside at_step(k), so only row k of the step embedding learns; the fake score's outputs at
    other steps are untouched by it; outside at_step the embedding is not added."""
    from dmdscale.core.sampling import draw_k

    timesteps = [999, 749, 499, 249]
    step, gen, critic, mixture = make_step({"generator.timesteps": timesteps, "loss.step_conditioned_critic": True,
                                            "loss.gan_generator_weight": 0.1, "loss.gan_critic_weight": 0.1})
    critic = Critic(MLPDenoiser(NoiseSchedule.ddpm(), 2, 16, 2), MLPHead(16, 16), len(timesteps))
    assert critic.step_embedding.weight.shape == (4, critic.fake_score.time_dim)
    assert torch.count_nonzero(critic.step_embedding.weight) == 0  # starts as the shared critic
    step.critic_opt = TorchOptimizedModule(critic, step.cfg.train, role="critic")
    i = next(i for i in range(50) if draw_k(i, 4, step.cfg.train.seed) == 2)
    m = step(Batch(mixture.sample(32)), i)
    assert m["nonfinite_critic"] == 0 and m["nonfinite_generator"] == 0
    moved = critic.step_embedding.weight.detach().abs().sum(1) > 0
    assert moved.tolist() == [False, False, True, False]

    x, t = torch.randn(8, 2), torch.full((8,), 300)
    with torch.no_grad():
        plain = critic.fake_score(x, t)
        with critic.at_step(0):  # row 0 is still zero
            torch.testing.assert_close(critic.fake_score(x, t), plain, rtol=0, atol=0)
        with critic.at_step(2):
            assert not torch.allclose(critic.fake_score(x, t), plain)
        torch.testing.assert_close(critic.fake_score(x, t), plain, rtol=0, atol=0)


def test_step_conditioned_critic_starts_from_a_shared_critics_weights_and_needs_a_time_embedding(tmp_path):
    from dmdscale.distributed.worker import build_players

    teacher = str(_unet_folder(tmp_path / "teacher"))
    cfg = build_config({}, {"model.family": "unet2d", "model.teacher": teacher})
    _, generator, shared = build_players(cfg, resolve(cfg), teacher, torch.device("cpu"))
    with torch.no_grad():
        for p in shared.parameters():
            p.add_(0.01)
    save_stage(tmp_path / "run1", {"generator": generator.state_dict(), "critic": shared.state_dict()})
    stage2 = build_config({}, {"model.family": "unet2d", "model.teacher": teacher, "train.init": str(tmp_path / "run1"),
                               "generator.timesteps": [999, 499], "loss.step_conditioned_critic": True})
    _, _, critic = build_players(stage2, resolve(stage2), teacher, torch.device("cpu"))
    width = critic.fake_score.unet.time_embedding.linear_2.out_features
    assert critic.step_embedding.weight.shape == (2, width)
    assert torch.count_nonzero(critic.step_embedding.weight) == 0
    for name, p in shared.state_dict().items():
        assert torch.equal(p, critic.state_dict()[name]), name
    with torch.no_grad():  # the hook sits on the UNet's time embedding: row 1 moves the fake score
        critic.step_embedding.weight[1] = 0.5
        x, t, y = torch.randn(2, 1, 16, 16), torch.full((2,), 500), torch.tensor([1, 2])
        with critic.at_step(1):
            assert not torch.allclose(critic.fake_score(x, t, y), shared.fake_score(x, t, y))
            assert not torch.allclose(critic(x, t, y), shared(x, t, y))  # and the discriminator
        with critic.at_step(0):
            torch.testing.assert_close(critic(x, t, y), shared(x, t, y))

    with pytest.raises(ValueError, match="loss.step_conditioned_critic"):
        Critic(MixtureDenoiser(GaussianMixture2D(), NoiseSchedule.ddpm()), MLPHead(16, 16), 4)
