"""Issue 34's levers through the real command (Ray Data, Ray Train + DeepSpeed): a quick
2-step digits run with every lever on (conftest's `levers_run`) trains, logs each lever's
figures and exports."""
import json

import numpy as np
import pytest


@pytest.mark.slow
def test_every_variety_lever_runs_through_ray_train(levers_run):
    _, out, proc, _ = levers_run
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
