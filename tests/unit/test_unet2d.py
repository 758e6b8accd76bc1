"""unet2d + teacher: real diffusers UNets built from tiny configs, saved and loaded locally."""
import os
import time

import numpy as np
import pytest
import torch

from dmdscale.core.networks import Critic
from dmdscale.models.heads import ConvHead
from dmdscale.families.unet2d.model import ClassConditionalUNet, load_unet, tiny_unet_config
from dmdscale.families.unet2d.teacher import ddpm_scheduler, load_or_train_teacher, save_teacher, train_teacher

NUM_CLASSES = 10


def _config(width: int = 8) -> dict:
    return tiny_unet_config(resolution=8, channels=1, num_classes=NUM_CLASSES, width=width)


def _model(prediction_type: str = "epsilon", seed: int = 0) -> ClassConditionalUNet:
    torch.manual_seed(seed)
    sched = dict(ddpm_scheduler().config, prediction_type=prediction_type)
    return ClassConditionalUNet.from_config(_config(), sched).eval()


def _inputs(n: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(n, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return x_t, t, labels


def _data(n: int = 64, seed: int = 0):
    """Tiny 'digits': a bright square whose position encodes the label (learnable in steps)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    images = np.zeros((n, 8, 8, 1), np.uint8)
    for i, y in enumerate(labels):
        r, c = divmod(int(y), 5)
        images[i, 4 * r:4 * r + 3, c:c + 3] = 255
    return images, labels


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_forward_is_x0_of_the_native_prediction(prediction_type):
    model = _model(prediction_type)
    assert model.prediction_type == prediction_type
    x_t, t, labels = _inputs()
    with torch.no_grad():
        native = model.unet(x_t, t, class_labels=labels).sample
        expected = model.schedule.to_x0(native, x_t, t, prediction_type)
        torch.testing.assert_close(model(x_t, t, labels, 1.0), expected)


def test_cfg_combines_conditional_and_null_class_x0():
    model = _model()
    x_t, t, labels = _inputs()
    s = 3.0
    null = torch.full_like(labels, NUM_CLASSES)
    assert torch.equal(model.null_cond(labels), null)
    with torch.no_grad():
        x0_c = model.schedule.to_x0(model.unet(x_t, t, class_labels=labels).sample, x_t, t, "epsilon")
        x0_u = model.schedule.to_x0(model.unet(x_t, t, class_labels=null).sample, x_t, t, "epsilon")
        torch.testing.assert_close(model(x_t, t, labels, s), x0_u + s * (x0_c - x0_u), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(x0_c, x0_u)  # the null class really is a different input


def test_features_equal_the_hooked_mid_block_output_and_feed_the_critic():
    model = _model()
    x_t, t, labels = _inputs()
    captured = {}
    handle = model.unet.mid_block.register_forward_hook(lambda m, i, o: captured.update(mid=o))
    with torch.no_grad():
        model.unet(x_t, t, class_labels=labels)
    handle.remove()
    with torch.no_grad():
        feats = model.features(x_t, t, labels)
    torch.testing.assert_close(feats, captured["mid"], atol=0, rtol=0)
    assert feats.shape == (4, model.feature_channels, 2, 2)

    critic = Critic(model, ConvHead.for_model(model))
    logits = critic(x_t, t, labels)
    assert logits.shape == (4,)
    logits.sum().backward()  # the head and the trunk both get gradients
    assert critic.head.net[0].weight.grad is not None
    assert model.unet.conv_in.weight.grad is not None


def test_save_then_load_teacher_round_trip(tmp_path):
    model = _model("v_prediction", seed=3)
    save_teacher(model.unet, ddpm_scheduler(), tmp_path / "teacher")
    assert (tmp_path / "teacher" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_unet(tmp_path / "teacher")
    assert isinstance(loaded, ClassConditionalUNet) and loaded.prediction_type == "v_prediction"
    assert not any(p.requires_grad for p in loaded.parameters())
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)  # bit for bit
    x_t, t, labels = _inputs()
    with torch.no_grad():
        # Equal weights, but CPU kernels may sum in another order for memory-mapped weights
        # (seen: 1.5e-6 on a 2-core box), so the outputs are compared at float32 precision.
        torch.testing.assert_close(loaded(x_t, t, labels, 2.0), model(x_t, t, labels, 2.0), atol=1e-5, rtol=1e-5)


def test_load_teacher_names_a_folder_without_unet(tmp_path):
    (tmp_path / "scheduler").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*unet/"):
        load_unet(tmp_path)


def test_load_or_train_teacher_caches_by_inputs(tmp_path):
    images, labels = _data()
    kw = dict(steps=3, batch_size=8, lr=1e-3, progress=False)
    first = load_or_train_teacher(tmp_path, images, labels, _config(), **kw)
    assert (first / "teacher_meta.json").is_file()
    assert isinstance(load_unet(first), ClassConditionalUNet)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # no half cache left
    mtime = os.stat(first / "unet").st_mtime_ns

    start = time.perf_counter()
    second = load_or_train_teacher(tmp_path, images, labels, _config(), seed=0, **kw)  # seed=0 is the default
    assert second == first and time.perf_counter() - start < 0.5
    assert os.stat(first / "unet").st_mtime_ns == mtime

    other = load_or_train_teacher(tmp_path, images, labels, _config(width=16), **kw)
    assert other != first and other.is_dir()
    assert load_or_train_teacher(tmp_path, images, (labels + 1) % NUM_CLASSES, _config(), **kw) != first


def test_short_training_lowers_the_ddpm_loss():
    images, labels = _data()
    losses: list[float] = []
    unet, scheduler = train_teacher(images, labels, _config(), steps=60, batch_size=32, lr=2e-3,
                                    warmup_steps=5, progress=False,
                                    callback=lambda step, loss: losses.append(loss))
    assert len(losses) == 60 and scheduler.config.prediction_type == "v_prediction"
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.7 * first, (first, last)
    assert not unet.training


@pytest.mark.parametrize("timesteps", [[999], [999, 749, 499, 249]])
def test_exported_student_samples_with_diffusers_alone(tmp_path, timesteps):
    """The export's LCMScheduler + UNet2DModel reproduce dmdscale's few-step sampler."""
    import json

    from diffusers import LCMScheduler, UNet2DModel

    from dmdscale.core.sampling import sample
    from dmdscale.families.unet2d.export import export_unet_student

    student = _model("v_prediction")
    export_unet_student(student, timesteps, tmp_path / "student")
    unet = UNet2DModel.from_pretrained(tmp_path / "student", subfolder="unet").eval()
    scheduler = LCMScheduler.from_pretrained(tmp_path / "student", subfolder="scheduler")
    saved = json.loads((tmp_path / "student" / "dmdscale.json").read_text())
    assert saved["timesteps"] == timesteps
    scheduler.set_timesteps(**saved["call"])  # the ordinary call: num_inference_steps=len(timesteps)
    assert saved["call"] == {"num_inference_steps": len(timesteps)} and scheduler.timesteps.tolist() == timesteps

    noise, labels = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([1, 4, 7])
    with torch.no_grad():
        x, g = noise, torch.Generator().manual_seed(9)
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t, class_labels=labels).sample, t, x, generator=g).prev_sample
        ours = sample(student, student.schedule, noise, timesteps, labels, rng=torch.Generator().manual_seed(9))
    torch.testing.assert_close(x, ours, atol=1e-4, rtol=1e-4)


def test_regression_pairs_are_the_teachers_ode_outputs_for_every_class():
    from dmdscale.config import ConfigError, build_config
    from dmdscale.core.sampling import teacher_sample
    from dmdscale.families import resolve

    cfg = build_config({}, {"model.family": "unet2d", "model.teacher": "train", "data.resolution": 8,
                            "data.num_classes": NUM_CLASSES, "loss.regression_weight": 0.01,
                            "loss.regression_pairs": 12, "loss.regression_sampler_steps": 3})
    teacher, family = _model(), resolve(cfg)
    pairs = family.regression_pairs(cfg, teacher, "cpu")
    assert pairs.noise.shape == (12, 1, 8, 8) and pairs.cond.tolist() == [i % NUM_CLASSES for i in range(12)]
    torch.testing.assert_close(pairs.target, teacher_sample(teacher, pairs.noise, 3, pairs.cond))
    again = family.regression_pairs(cfg, teacher, "cpu")  # every rank and every resume: the same pairs
    assert torch.equal(again.noise, pairs.noise)
    assert family.regression_pairs(build_config({}, {"model.family": "unet2d", "model.teacher": "train"}),
                                   teacher, "cpu") is None
    with pytest.raises(ConfigError, match="loss.regression_weight.*regression stage"):
        resolve(build_config({}, {"model.family": "sd15", "model.teacher": "/nonexistent", "data.channels": 3,
                                  "loss.regression_weight": 0.1}))
