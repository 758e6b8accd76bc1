"""Issue 34's levers through the real command (Ray Data, Ray Train + DeepSpeed): a quick
2-step digits run with every lever on trains, logs each lever's figures and exports."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipelines" / "digits.py"


@pytest.mark.slow
def test_every_variety_lever_runs_through_ray_train(tmp_path, digits_cache):
    out = tmp_path / "run"
    levers = ["generator.timesteps=[999,249]", "generator.step_draw=row", "loss.step_noise_bands=true",
              "loss.step_conditioned_critic=true", "loss.divergence=jensen_shannon", "loss.gan_gate_accuracy=0.6",
              "loss.gan_weight_cap=0.5", "loss.fake_score_timesteps=dm", "loss.regression_weight=0.01",
              "loss.regression_lowpass=2", "loss.regression_anneal_steps=8", "loss.regression_pairs=32",
              "loss.regression_sampler_steps=4"]
    proc = subprocess.run([sys.executable, str(PIPELINE), "--quick", "--out", str(out), f"cache_dir={digits_cache}",
                           "train.max_steps=10", "train.log_every=1", "eval.during_training=false",
                           "eval.num_samples=20", *levers], capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps_completed"] == 10 and m["student_steps"] == 2 and m["nonfinite_steps"] == 0
    log = json.loads((out / "train_log.json").read_text())
    generator_turns = [r for r in log if r.get("generator_updated") == 1.0]
    # The f-divergence weights, the gate and the annealed regression weight reached the workers.
    assert generator_turns and all("dm_weight_max" in r and "gan_gate" in r for r in generator_turns)
    assert any("d_accuracy" in r for r in log)
    weights = [r["regression_weight"] for r in generator_turns if "regression_weight" in r]
    assert weights and weights == sorted(weights, reverse=True) and weights[0] <= 0.01
    assert all(r["gan_weight"] <= 0.5 for r in generator_turns)
    assert np.isfinite(m["fid_student"]) and json.loads((out / "student" / "dmdscale.json").read_text())[
        "timesteps"] == [999, 249]
