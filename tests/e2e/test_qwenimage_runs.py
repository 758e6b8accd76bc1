"""The Qwen-Image family end to end on a tiny random-weight QwenImagePipeline (built offline by
`dmdscale.families.qwenimage.tiny`): Ray Data (Qwen2.5-VL + VAE encoding) -> Ray Train +
DeepSpeed ZeRO-3 with the frozen teacher sharded -> an exported QwenImagePipeline that stock
diffusers loads and samples at the trained timesteps; 1 and 4 steps, the 4-step run with its
checkpoints evaluated on actors while it trains."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dmdscale.config import load_config
from dmdscale.driver import run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from dmdscale.families.qwenimage.tiny import build_tiny_qwen_pipeline

    return str(build_tiny_qwen_pipeline(tmp_path_factory.mktemp("tiny-qwen") / "qwenimage", 32))


def quick(teacher: str, tmp_path, *overrides: str):
    return load_config("pipelines/configs/qwenimage.yaml",
                       [f"model.teacher={teacher}", f"cache_dir={tmp_path / 'cache'}", "scale.shuffle_buffer=16",
                        "scale.zero_stage=3", "scale.shard_teacher=true", *overrides], quick=True)


def sampled_timesteps(folder, call: dict) -> list[float]:
    """The transformer's timestep input at each step of the exported pipeline, one pass per step."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "QwenImagePipeline"
    seen = []
    pipe.transformer.register_forward_hook(
        lambda m, a, kw, o: seen.append((kw["hidden_states"].shape[0], float(kw["timestep"][0]))), with_kwargs=True)
    images = pipe(["a handwritten digit 4"], height=32, width=32, output_type="np", **call).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()
    assert all(batch == 1 for batch, _ in seen)  # no CFG pass: guidance is distilled in
    return [t for _, t in seen]


def test_qwenimage_one_step_student(ray_local, tiny_qwen, captioned_parquet, tmp_path, monkeypatch):
    """One step from pure noise: the exported folder's recorded call runs the transformer once at
    sigma 1, the model card gives that call, and every contract output is there."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "one"
    metrics = run(quick(tiny_qwen, tmp_path, f"data.path={captioned_parquet}", "generator.timesteps=[999]"), out)
    assert metrics["steps_completed"] == 4 and metrics["nonfinite_steps"] == 0
    assert metrics["student_steps"] == 1 and metrics["usable_rows"] == 96
    assert metrics["teacher_parameters_per_rank"] > 0
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (8, 32, 32, 3) and samples["images"].std() > 0
    log = json.loads((out / "train_log.json").read_text())
    assert all(np.isfinite(r["loss_fake_score"]) for r in log) and any("loss_gan_critic" in r for r in log)

    info = json.loads((out / "student" / "dmdscale.json").read_text())
    assert info["family"] == "qwenimage" and info["timesteps"] == [999]
    assert info["call"] == {"num_inference_steps": 1, "true_cfg_scale": 1.0}
    assert sampled_timesteps(out / "student", info["call"]) == [pytest.approx(1.0)]
    assert "true_cfg_scale=1.0" in (out / "student" / "README.md").read_text()


def test_qwenimage_four_step_student_evaluated_while_training(ray_local, tiny_qwen, captioned_parquet, tmp_path,
                                                              monkeypatch):
    """Four steps with backward simulation and a token discriminator: the exported student steps
    through exactly the trained sigmas, and the checkpoint at step 2 is evaluated on an actor while
    training goes on (FID on CLIP features and CLIP score in MLflow at its step; the last one is the
    final evaluation's)."""
    import mlflow
    import torch

    from dmdscale.core.schedule import FlowMatchSchedule
    from dmdscale.families.qwenimage.model import image_seq_len
    from dmdscale.families.sd.tiny import build_tiny_clip

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    clip = build_tiny_clip(tmp_path / "clip")
    out = tmp_path / "four"
    metrics = run(quick(tiny_qwen, tmp_path, f"data.path={captioned_parquet}", "loss.gan_feature_depths=[1,2]",
                        "eval.during_training=true", f"eval.clip_model={clip}", "eval.feature_extractor=clip"), out)
    assert metrics["steps_completed"] == 4 and metrics["student_steps"] == 4 and metrics["nonfinite_steps"] == 0

    evaluations = json.loads((out / "checkpoint_evaluations.json").read_text())
    assert [e["step"] for e in evaluations] == [2] and metrics["checkpoint_evaluations"] == 1
    assert all("error" not in e and np.isfinite(e["fid_student"]) and 0 <= e["clip_score_student"] <= 100
               for e in evaluations), evaluations
    client = mlflow.MlflowClient()
    (logged,) = client.search_runs([client.get_experiment_by_name("qwenimage").experiment_id])
    history = {m.step for m in client.get_metric_history(logged.info.run_id, "clip_score_student")}
    assert 2 in history

    info = json.loads((out / "student" / "dmdscale.json").read_text())
    assert info["timesteps"] == [999, 749, 499, 249] and info["call"]["true_cfg_scale"] == 1.0
    config = json.loads((out / "student" / "scheduler" / "scheduler_config.json").read_text())
    schedule = FlowMatchSchedule(config, image_seq_len(32, 4))  # the tiny VAE downsamples 4x
    trained = schedule.flow_sigmas[torch.tensor(info["timesteps"])]  # the pipeline passes sigma as the timestep
    assert sampled_timesteps(out / "student", info["call"]) == pytest.approx(trained.tolist(), rel=1e-4)
