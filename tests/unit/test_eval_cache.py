"""The evaluation cache: the teacher's samples and their figures are made once per key and read
back after."""
import numpy as np
import torch

from dmdscale.eval.cache import cached_arrays, cached_figures, folder_fingerprint, key_name, module_fingerprint


def test_a_key_is_drawn_once_and_a_changed_key_draws_again(tmp_path):
    calls = []

    def make(value):
        def draw():
            calls.append(value)
            return {"teacher": np.full((3, 2, 2, 1), value, np.uint8), "teacher_1step": np.zeros(2, np.uint8)}
        return draw

    key = {"teacher": "abc", "teacher_steps": 50, "labels": np.arange(3), "seed": 7}
    first, cached = cached_arrays(tmp_path, key, make(1))
    assert not cached and calls == [1]
    again, cached = cached_arrays(tmp_path, dict(key), make(2))
    assert cached and calls == [1] and np.array_equal(again["teacher"], first["teacher"])
    for change in ({"teacher_steps": 20}, {"teacher": "abd"}, {"labels": np.arange(3) + 1}, {"seed": 8}):
        _, cached = cached_arrays(tmp_path, key | change, make(3))
        assert not cached
    assert calls == [1, 3, 3, 3, 3]
    _, cached = cached_arrays(None, key, make(4))  # no folder: nothing kept
    assert not cached and calls[-1] == 4


def test_a_damaged_file_is_drawn_again(tmp_path):
    key = {"teacher": "abc"}
    cached_arrays(tmp_path, key, lambda: {"a": np.ones(4)})
    (stored,) = tmp_path.glob("*.npz")
    stored.write_bytes(stored.read_bytes()[:20])
    arrays, cached = cached_arrays(tmp_path, key, lambda: {"a": np.zeros(4)})
    assert not cached and not arrays["a"].any()


def test_the_teachers_identity_is_its_bytes_not_its_path(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name / "unet").mkdir(parents=True)
        (tmp_path / name / "unet" / "w.bin").write_bytes(b"weights")
    assert folder_fingerprint(tmp_path / "a") == folder_fingerprint(tmp_path / "b")
    (tmp_path / "b" / "unet" / "w.bin").write_bytes(b"weightz")
    assert folder_fingerprint(tmp_path / "a") != folder_fingerprint(tmp_path / "b")


def test_figures_are_measured_once_per_key_and_again_when_the_extractor_changes(tmp_path):
    calls = []

    def measure(value):
        def figures():
            calls.append(value)
            return {"fid_teacher": value, "kid_teacher": value / 10}
        return figures

    extractor = torch.nn.Linear(3, 2)
    key = {"teacher": "abc", "held_out": np.arange(6), "extractor": module_fingerprint(extractor)}
    first, cached = cached_figures(tmp_path, key, measure(1.5))
    again, cached_again = cached_figures(tmp_path, dict(key), measure(2.5))
    assert (cached, cached_again, calls) == (False, True, [1.5]) and again == first == {"fid_teacher": 1.5,
                                                                                     "kid_teacher": 0.15}
    with torch.no_grad():
        extractor.weight[0, 0] += 1  # other features: other figures
    for change in ({"extractor": module_fingerprint(extractor)}, {"held_out": np.arange(6) + 1}):
        _, cached = cached_figures(tmp_path, key | change, measure(3.5))
        assert not cached
    assert calls == [1.5, 3.5, 3.5]
    (tmp_path / f"{key_name(key)}.json").write_text("{")  # damaged: measured again
    assert cached_figures(tmp_path, key, measure(4.5)) == ({"fid_teacher": 4.5, "kid_teacher": 0.45}, False)
    assert module_fingerprint("inception") == "inception"


def test_the_regression_losss_pairs_are_sampled_once_per_teacher_and_settings(tmp_path):
    """The anchor's ODE pairs (minutes of teacher sampling at the default count) are kept under
    cache_dir for the next run with the same teacher; a changed seed or teacher samples anew."""
    from diffusers import UNet2DModel

    from dmdscale.config import build_config
    from dmdscale.distributed.worker import regression_pairs
    from dmdscale.families import resolve
    from dmdscale.families.unet2d.model import tiny_unet_config
    from dmdscale.families.unet2d.teacher import ddpm_scheduler, save_teacher

    torch.manual_seed(0)
    teacher_dir = save_teacher(UNet2DModel.from_config(tiny_unet_config(8, 1, 10, 8)), ddpm_scheduler("v_prediction"),
                               tmp_path / "teacher")
    settings = {"model.family": "unet2d", "data.resolution": 8, "model.teacher": str(teacher_dir),
                "cache_dir": str(tmp_path / "cache"),
                "loss.regression_weight": 1.0, "loss.regression_pairs": 6, "loss.regression_sampler_steps": 3}
    cfg = build_config({}, settings)
    family = resolve(cfg)
    teacher = family.load_teacher(cfg, str(teacher_dir))
    calls = []
    original = family.regression_pairs

    def counted(*args):
        calls.append(args[0].train.seed)
        return original(*args)

    family.regression_pairs = counted
    first = regression_pairs(cfg, family, teacher, str(teacher_dir), torch.device("cpu"))
    again = regression_pairs(cfg, family, teacher, str(teacher_dir), torch.device("cpu"))
    assert calls == [cfg.train.seed] and first.target.shape == (6, 1, 8, 8)
    for name in ("noise", "target", "cond"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    other_seed = build_config({}, settings | {"train.seed": cfg.train.seed + 1})
    fresh = regression_pairs(other_seed, family, teacher, str(teacher_dir), torch.device("cpu"))
    assert len(calls) == 2 and not torch.equal(fresh.noise, first.noise)
    assert len(list((tmp_path / "cache" / "regression_pairs").glob("*.safetensors"))) == 2
