"""The flow-matching transformer families end to end on tiny random-weight SD3 and FLUX
pipelines: Ray Data (CLIP + T5 + VAE encoding) -> Ray Train + DeepSpeed -> an exported
StableDiffusion3Pipeline / FluxPipeline that stock diffusers loads and samples at the trained
timesteps, with its checkpoints evaluated on actors while training goes on (FID on CLIP features
and CLIP score in MLflow at their steps); the FLUX LoRA run's adapter reproduces the student on
the teacher pipeline."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dmdscale.config import load_config
from dmdscale.data.latents import CACHE_MARKER
from dmdscale.driver import run

pytestmark = pytest.mark.slow
CONFIGS = "pipelines/configs"




def evaluated(tmp_path) -> list[str]:
    """Checkpoint evaluation on, with a tiny local CLIP for FID features and CLIP score."""
    from dmdscale.families.sd.tiny import build_tiny_clip

    clip = tmp_path / "clip"
    if not clip.exists():
        build_tiny_clip(clip)
    return ["eval.during_training=true", f"eval.clip_model={clip}", "eval.feature_extractor=clip"]


def check_checkpoint_evaluations(out, metrics: dict, steps: list[int], experiment: str) -> None:
    """Each checkpoint evaluated without error, its FID and CLIP score in MLflow at its step."""
    import mlflow

    evaluations = json.loads((out / "checkpoint_evaluations.json").read_text())
    assert [e["step"] for e in evaluations] == steps and metrics["checkpoint_evaluations"] == len(steps)
    assert all("error" not in e and np.isfinite(e["fid_student"]) and 0 <= e["clip_score_student"] <= 100
               for e in evaluations), evaluations
    client = mlflow.MlflowClient()
    (logged,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    for name in ("fid_student", "clip_score_student"):
        history = {m.step: m.value for m in client.get_metric_history(logged.info.run_id, name)}
        assert set(steps) <= set(history), (name, history)
        assert history[steps[0]] == pytest.approx(evaluations[0][name])


def quick(family: str, teacher: str, tmp_path, *overrides: str):
    return load_config(f"{CONFIGS}/{family}.yaml", [f"model.teacher={teacher}", f"cache_dir={tmp_path / 'cache'}",
                                                     "scale.shuffle_buffer=16", *overrides], quick=True)


def loaded(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd3_four_step_student_end_to_end(ray_local, tiny_flow, captioned_parquet, tmp_path, monkeypatch):
    """The SD3 quick pipeline (4 steps, backward simulation, CFG teacher, token discriminator at
    two depths, ZeRO-3 engines and the teacher in a ZeRO-3 partition, as the full config runs
    it; the two-worker partition is checked in tests/ray/test_sharded_teacher.py): contract outputs, the MLflow run, and a student folder whose recorded call runs
    the transformer at exactly the trained sigmas with no CFG."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "sd3"
    metrics = run(quick("sd3", tiny_flow["sd3"], tmp_path, f"data.path={captioned_parquet}",
                        "loss.gan_feature_depths=[1,2]", "scale.zero_stage=3", "scale.shard_teacher=true",
                        *evaluated(tmp_path)), out)
    check_checkpoint_evaluations(out, metrics, [2], "sd3")  # the last is the final evaluation's

    assert metrics["steps_completed"] == 4 and metrics["nonfinite_steps"] == 0
    assert metrics["student_steps"] == 4 and metrics["usable_rows"] == 96
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (8, 32, 32, 3) and samples["images"].std() > 0
    log = json.loads((out / "train_log.json").read_text())
    assert all(np.isfinite(r["loss_fake_score"]) and r["loss_fake_score"] > 0 for r in log)
    assert any("loss_gan_critic" in r for r in log)

    info = json.loads((out / "student" / "dmdscale.json").read_text())
    assert info["timesteps"] == [999, 749, 499, 249]
    assert info["call"] == {"sigmas": [1.0, 0.75, 0.5, 0.25], "guidance_scale": 1.0}
    pipe = loaded(out / "student")
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    seen = []
    pipe.transformer.register_forward_hook(lambda m, a, kw, o: seen.append(kw["hidden_states"].shape[0]),
                                           with_kwargs=True)
    pipe(["a handwritten digit 4"], height=32, width=32, output_type="np", **info["call"])
    assert seen == [1, 1, 1, 1]  # four steps, one pass each: no CFG batch
    card = (out / "student" / "README.md").read_text()
    assert "guidance_scale=1.0" in card and "StableDiffusion3Pipeline" in (out / "student" / "model_index.json"
                                                                            ).read_text()
    client = mlflow.MlflowClient()
    (logged,) = client.search_runs([client.get_experiment_by_name("sd3").experiment_id])
    assert logged.data.params["model.family"] == "sd3" and "loss_dm" in logged.data.metrics


def test_flux_one_step_lora_student_end_to_end(ray_local, tiny_flow, captioned_parquet, tmp_path, monkeypatch):
    """FLUX with a LoRA generator, one step and a latent cache: the exported FluxPipeline samples with
    num_inference_steps=1 alone (its default embedded guidance is the trained one), and the
    teacher pipeline with the exported LoRA loaded gives the same latents."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "flux"
    metrics = run(quick("flux", tiny_flow["flux"], tmp_path, f"data.path={captioned_parquet}",
                        "generator.timesteps=[999]", "lora.enabled=true", "lora.rank=4", "lora.alpha=4",
                        f"data.latent_cache={tmp_path / 'latents'}", *evaluated(tmp_path)), out)
    check_checkpoint_evaluations(out, metrics, [2], "flux")  # LoRA: the adapter merged per evaluation
    assert metrics["steps_completed"] == 4 and metrics["nonfinite_steps"] == 0 and metrics["student_steps"] == 1
    assert (tmp_path / "latents" / CACHE_MARKER).is_file()  # CLIP + T5 + VAE rows written once, as Parquet

    info = json.loads((out / "student" / "dmdscale.json").read_text())
    assert info["call"] == {"num_inference_steps": 1} and info["guidance_scale"] == 3.5
    student = loaded(out / "student")
    assert type(student).__name__ == "FluxPipeline"

    def latents(pipe):
        return pipe(["a handwritten digit 4"], height=32, width=32, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **info["call"]).images

    teacher = loaded(tiny_flow["flux"])
    before = latents(teacher)
    teacher.load_lora_weights(str(out / "student" / "lora"))
    with_lora = latents(teacher)
    assert not torch.allclose(before, with_lora, atol=1e-6)  # the adapter trained
    torch.testing.assert_close(with_lora, latents(student), rtol=1e-4, atol=1e-4)
