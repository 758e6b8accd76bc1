"""export.choose=held_out: the exported student is whichever trained weights score best on the
held-out figure; the one exported before moves under alternates/ and nothing is lost."""
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from dmdscale.config import ConfigError, build_config
from dmdscale.contracts import Trained
from dmdscale.families import resolve
from dmdscale.families.unet2d import Inputs
from dmdscale.families.unet2d.model import tiny_unet_config


def _student(folder, bias):
    """A tiny student whose images are brighter the larger `bias` (its output layer's bias)."""
    unet = UNet2DModel(**tiny_unet_config(16, 1, 10, 8))
    with torch.no_grad():
        unet.conv_out.bias.fill_(bias)
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(prediction_type="sample").save_pretrained(folder / "scheduler")
    return folder


def test_the_best_held_out_weights_are_exported_and_the_rest_kept(tmp_path, monkeypatch):
    import dmdscale.eval.metrics as metrics

    out = tmp_path / "run"
    _student(out / "student", 0.5)  # export.ema's average
    _student(out / "alternates" / "raw" / "student", -0.5)  # darker: the "better" one below
    _student(out / "alternates" / "ema_0.9" / "student", 0.0)
    # The FID itself is tested elsewhere; here a stand-in ranks the candidates by brightness.
    monkeypatch.setattr(metrics, "compute_fid_kid", lambda images, real, extractor: (float(images.mean()), 0.0))
    cfg = build_config({}, {"model.family": "unet2d", "model.teacher": "train", "train.ema_decays": [0.9, 0.97],
                            "export.ema": 0.97, "export.choose": "held_out", "export.choose_samples": 20,
                            "data.resolution": 16})
    family = resolve(cfg)
    inputs = Inputs("t", "h", "teacher", held_out=(np.zeros((20, 16, 16, 1), np.uint8), np.arange(20) % 10),
                    classifier=None)
    trained = family.choose_export(cfg, inputs, Trained(str(out / "student"), {"steps_completed": 3}, []))

    assert trained.metrics["student_weights"] == "raw" and trained.metrics["steps_completed"] == 3
    fids = trained.metrics["export_choice_fid"]
    assert set(fids) == {"ema_0.97", "raw", "ema_0.9"} and min(fids, key=fids.get) == "raw"
    exported = UNet2DModel.from_pretrained(out / "student", subfolder="unet")
    assert float(exported.conv_out.bias[0]) == pytest.approx(-0.5)  # the winner is what student/ holds
    moved = UNet2DModel.from_pretrained(out / "alternates" / "ema_0.97" / "student", subfolder="unet")
    assert float(moved.conv_out.bias[0]) == pytest.approx(0.5)  # the former export, kept under its name
    assert not (out / "alternates" / "raw").exists()
    assert sorted(p.name for p in (out / "alternates").iterdir()) == ["ema_0.9", "ema_0.97"]
    assert "student_ema_0.97" in {n.removeprefix("fid_") for n in family.evaluation_figures(cfg)}
    json.dumps(trained.metrics)  # metrics.json takes it as it is

    # fixed (the default) exports export.ema's average, untouched
    same = family.choose_export(cfg.model_copy(update={"export": cfg.export.model_copy(update={"choose": "fixed"})}),
                                inputs, trained)
    assert same is trained


def test_choosing_needs_a_family_that_measures_it_and_weights_to_choose_from():
    with pytest.raises(ConfigError, match="export.choose: held_out .* unet2d families .* 'sd15' takes 'fixed'"):
        resolve(build_config({}, {"model.family": "sd15", "model.teacher": "x", "data.channels": 3,
                                  "export.choose": "held_out", "train.ema_decays": [0.9]}))
    with pytest.raises(ConfigError, match="export.choose: held_out compares .* train.ema_decays"):
        resolve(build_config({}, {"model.family": "unet2d", "model.teacher": "train", "export.choose": "held_out"}))
