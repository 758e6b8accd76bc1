"""Text-to-image end to end on tiny SD1.5 and SDXL pipelines: Ray Data latents -> Ray Train +
DeepSpeed -> an exported diffusers pipeline that loads and generates; the LoRA variant's weights
reproduce the student on the teacher pipeline."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dmdscale.config import ConfigError, load_config
from dmdscale.data.sources import DataError
from dmdscale.driver import run
from dmdscale.families import resolve

pytestmark = pytest.mark.slow
CONFIGS = "pipelines/configs"


def quick(family: str, teacher: str, tmp_path, *overrides: str):
    return load_config(f"{CONFIGS}/{family}.yaml", [f"model.teacher={teacher}", f"cache_dir={tmp_path / 'cache'}",
                                                     "scale.shuffle_buffer=16", *overrides], quick=True)


def generate_latents(pipe, **call) -> torch.Tensor:
    return pipe(["a handwritten digit 4"], height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0), **call).images


def test_sd15_one_step_end_to_end(ray_local, tiny, captioned_parquet, tmp_path, monkeypatch):
    """The SD1.5 quick pipeline with checkpoint evaluation on: contract outputs, the MLflow run,
    checkpoints 3 and 6 evaluated on an actor while training goes on (FID on CLIP features and
    CLIP score at those steps in MLflow, with prompt grids; fid.png and clip.png), and a student
    folder that stock diffusers loads and samples in one UNet call with the call its card gives."""
    import mlflow
    import yaml
    from diffusers import DiffusionPipeline

    from dmdscale.eval.checkpoints import GRID_ARTIFACT_DIR
    from dmdscale.families.sd.tiny import build_tiny_clip

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    clip = build_tiny_clip(tmp_path / "clip")
    out = tmp_path / "sd15"
    cfg = quick("sd15", tiny["sd15"], tmp_path, f"data.path={captioned_parquet}", "train.max_steps=7",
                "eval.during_training=true", f"eval.clip_model={clip}", "eval.feature_extractor=clip")
    metrics = run(cfg, out)

    assert metrics["steps_completed"] == 7 and metrics["nonfinite_steps"] == 0
    assert metrics["student_steps"] == 1 and metrics["usable_rows"] == 96
    assert json.loads((out / "metrics.json").read_text()) == metrics
    samples = np.load(out / "samples.npz")
    assert samples["images"].shape == (8, 32, 32, 3) and samples["images"].dtype == np.uint8
    assert len(samples["prompts"]) == 8
    assert samples["images"].std() > 0

    evaluations = json.loads((out / "checkpoint_evaluations.json").read_text())
    assert [e["step"] for e in evaluations] == [3, 6] and metrics["checkpoint_evaluations"] == 2
    assert all("error" not in e and np.isfinite(e["fid_student"]) and 0 <= e["clip_score_student"] <= 100
               for e in evaluations)
    assert np.isfinite(metrics["fid_student"]) and {"clip_score_student", "clip_score_teacher"} <= set(metrics)
    # Every figure the run reports is one a sweep may name (sweep.metric is checked against these).
    numbers = {k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert numbers <= resolve(cfg).metric_names(cfg), numbers - resolve(cfg).metric_names(cfg)
    assert metrics["fid_feature_space"] == "clip" and metrics["eval_dropped_checkpoints"] == 0
    assert (out / "clip.png").stat().st_size > 0 and (out / "fid.png").stat().st_size > 0

    pipe = DiffusionPipeline.from_pretrained(str(out / "student"))
    calls = []
    pipe.unet.register_forward_hook(lambda m, args, kw, o: calls.append(int(args[1].flatten()[0])), with_kwargs=True)
    info = json.loads((out / "student" / "dmdscale.json").read_text())
    assert info["timesteps"] == [999] and info["call"] == {"num_inference_steps": 1}
    generate_latents(pipe, **info["call"])
    assert calls == [999]
    card = (out / "student" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["pipeline_tag"] == "text-to-image" and meta["dmdscale"]["timesteps"] == [999]
    assert "num_inference_steps=1" in card and f"{metrics['swd_pixels_student']:.4g}" in card

    client = mlflow.MlflowClient()
    (logged,) = client.search_runs([client.get_experiment_by_name("sd15").experiment_id])
    assert logged.data.params["model.family"] == "sd15"
    assert "loss_dm" in logged.data.metrics and "sampling_speedup" in logged.data.metrics
    for name in ("fid_student", "clip_score_student"):  # the checkpoints' figures at their steps
        history = {m.step: m.value for m in client.get_metric_history(logged.info.run_id, name)}
        assert {3, 6} <= set(history), (name, history)
        assert history[3] == pytest.approx(evaluations[0][name])
    grids = {a.path for a in client.list_artifacts(logged.info.run_id, GRID_ARTIFACT_DIR)}
    assert {f"{GRID_ARTIFACT_DIR}/step_0000003.png", f"{GRID_ARTIFACT_DIR}/step_0000006.png"} <= grids
    artifacts = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"metrics.json", "samples.png", "losses.png", "clip.png", "fid.png"} <= artifacts
    assert [r["step"] for r in json.loads((out / "train_log.json").read_text())][-1] == 6  # losses.png's data


# The SDXL LoRA variant (ZeRO-3, LoRA weights reproduced with load_lora_weights) runs end to
# end through `ray job submit` in tests/test_job_submit.py.


def test_bad_inputs_fail_before_any_cluster_work(tiny, tmp_path):
    """Each error comes from the driver's checks, before Ray, and names what is wrong."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [b"x"], "label": [1]}), tmp_path / "no_captions.parquet")
    with pytest.raises(DataError, match="prompt"):
        run(quick("sd15", tiny["sd15"], tmp_path, f"data.path={tmp_path / 'no_captions.parquet'}"), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="tokenizer_2"):
        run(quick("sdxl", tiny["sd15"], tmp_path), tmp_path / "b")  # an SD1.5 folder is no SDXL teacher
    with pytest.raises(ConfigError, match="lora.enabled"):
        resolve(load_config(f"{CONFIGS}/digits.yaml", ["lora.enabled=true"]))
