"""Text-to-image evaluation on real Ray with tiny models: `python -m dmdscale.evaluate` on an
exported student across 2 generation actors (reference statistics cached and reused), the
checkpoint evaluator measuring as the final evaluation does, and the sd15 checkpoint evaluation
pool's bounded queue."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import exported_text_student

pytestmark = pytest.mark.slow
PROMPTS = [f"a handwritten digit {i}" for i in range(8)]


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory):
    """An exported 1-step student (the tiny teacher's own UNet), a tiny CLIP, a prompt file."""
    return exported_text_student(tiny, tmp_path_factory.mktemp("text-eval"), PROMPTS)


def test_checkpoint_evaluator_measures_as_the_exported_student_is_measured(tiny, world, captioned_parquet):
    """The evaluator rebuilds the student around submitted generator weights (keys prefixed
    `unet.`); for the weights that were exported, its images and CLIP score are those of the
    exported folder sampled as SDFamily.evaluate samples it: one curve with the final figure."""
    from diffusers import DiffusionPipeline

    from dmdscale.config import build_config
    from dmdscale.eval.text import clip_score, load_clip, pipeline_images
    from dmdscale.export import STUDENT_INFO
    from dmdscale.families import FAMILIES
    from dmdscale.families.text2image import TextCheckpointEvaluator, text_eval_spec

    cfg = build_config({}, {"model.family": "sd15", "model.teacher": tiny["sd15"], "data.channels": 3,
                            "data.resolution": 32, "eval.num_samples": 8, "eval.clip_model": str(world["clip"])})
    spec = text_eval_spec(cfg, PROMPTS)
    real = np.random.RandomState(0).randint(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    evaluator = TextCheckpointEvaluator(FAMILIES["sd15"], cfg.model_dump(), tiny["sd15"], spec, real, "clip", None,
                                        None)
    weights = {f"unet.{k}": v for k, v in world["unet"].state_dict().items()}
    result = evaluator.evaluate(3, weights, {"ema_0.9": weights})
    assert "error" not in result, result.get("error")

    pipe = DiffusionPipeline.from_pretrained(str(world["student"]))
    pipe.set_progress_bar_config(disable=True)
    call = json.loads((world["student"] / STUDENT_INFO).read_text())["call"]
    exported = pipeline_images(pipe, PROMPTS, 32, cfg.train.seed, **call)
    assert result["clip_score_student"] == pytest.approx(clip_score(exported, PROMPTS, load_clip(world["clip"])),
                                                         abs=1e-3)
    assert result["clip_score_student_ema_0.9"] == pytest.approx(result["clip_score_student"], abs=1e-6)
    assert np.isfinite(result["fid_student"]) and np.isfinite(result["kid_student"])
    with torch.no_grad():
        for v in weights.values():
            if v.is_floating_point():
                v.mul_(0.5)  # other weights: other images, another score
    assert evaluator.evaluate(6, weights)["clip_score_student"] != pytest.approx(result["clip_score_student"],
                                                                                 abs=1e-3)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_checkpoint_evaluator_measures_as_the_exported_student_is_measured(tiny_flow, world, family, tmp_path):
    """The same evaluator contract for the flow transformers (evaluated during training since
    they share it): submitted generator weights (keys prefixed `transformer.`) give the images
    and CLIP score of the folder `export_flow_pipeline` writes around those weights, sampled with
    its recorded call."""
    from diffusers import DiffusionPipeline

    from dmdscale.config import build_config
    from dmdscale.eval.text import clip_score, load_clip, pipeline_images
    from dmdscale.export import STUDENT_INFO
    from dmdscale.families import FAMILIES
    from dmdscale.families.flow.export import export_flow_pipeline
    from dmdscale.families.text2image import TextCheckpointEvaluator, text_eval_spec

    teacher = tiny_flow[family]
    cfg = build_config({}, {"model.family": family, "model.teacher": teacher, "data.channels": 3,
                            "data.resolution": 32, "eval.num_samples": 8, "eval.clip_model": str(world["clip"])})
    prompts = PROMPTS
    real = np.random.RandomState(0).randint(0, 256, (8, 32, 32, 3)).astype(np.uint8)
    evaluator = TextCheckpointEvaluator(FAMILIES[family], cfg.model_dump(), teacher, text_eval_spec(cfg, prompts),
                                        real, "clip", None, None)
    transformer = DiffusionPipeline.from_pretrained(teacher).transformer
    with torch.no_grad():  # weights that are not the teacher's
        for p in transformer.parameters():
            p.mul_(0.9)
    result = evaluator.evaluate(2, {f"transformer.{k}": v for k, v in transformer.state_dict().items()})
    assert "error" not in result, result.get("error")

    student = export_flow_pipeline(teacher, family, transformer, cfg.generator.timesteps, tmp_path / "student", 32)
    pipe = DiffusionPipeline.from_pretrained(str(student))
    pipe.set_progress_bar_config(disable=True)
    call = json.loads((student / STUDENT_INFO).read_text())["call"]
    exported = pipeline_images(pipe, prompts, 32, cfg.train.seed, **call)
    assert result["clip_score_student"] == pytest.approx(clip_score(exported, prompts, load_clip(world["clip"])),
                                                         abs=1e-3)
    assert np.isfinite(result["fid_student"])


def test_evaluate_command_on_two_actors_caches_the_reference_statistics(ray_local, world, captioned_parquet, tmp_path,
                                                                      monkeypatch, capsys):
    """metrics.json with FID, patch FID and CLIP score from 2 generation actors; a second run
    (1 actor) reads the cached .npz (not rewritten) and, as chunk seeds do not depend on the
    actor count, gives the same figures; so does a run given only the .npz (--reference-stats).
    A real image that does not decode is left out, warned about and counted (also from the
    cache); paths given relative stay so, and neither metrics.json nor the .npz holds an
    absolute local path."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    from dmdscale.evaluate import main

    table = pq.read_table(captioned_parquet)
    broken = pa.table({name: [b"not an image" if name == "image" else table.column(name)[0].as_py()]
                       for name in table.column_names}, schema=table.schema)
    pq.write_table(pa.concat_tables([table, broken]), tmp_path / "real.parquet")
    monkeypatch.chdir(tmp_path)
    rel = {name: os.path.relpath(world[name], tmp_path) for name in ("student", "prompts", "clip")}

    def run(out: str, actors: int, *reference: str) -> dict:
        reference = reference or ("--real", "real.parquet", "--patch-fid", "--patch-size", "16")
        return main(["--student", rel["student"], "--prompts", rel["prompts"], "--out", out,
                     "--resolution", "32", "--num-samples", "8", "--batch-size", "2", "--fid-features", "clip",
                     "--clip-model", rel["clip"], "--num-actors", str(actors), "--cache-dir", "stats",
                     *reference])

    first = run("a", 2)
    text = (tmp_path / "a" / "metrics.json").read_text()
    assert json.loads(text) == first
    for local in (str(tmp_path), str(world["root"]), os.path.expanduser("~")):
        assert local not in text, local
    assert (tmp_path / "a" / "grid.png").stat().st_size > 0
    assert first["num_samples"] == 8 and first["num_actors"] == 2 and first["generated_resolution"] == 32
    assert first["student"] == rel["student"] and first["clip_model"] == rel["clip"]
    for name in ("fid", "patch_fid", "clip_score"):
        assert np.isfinite(first[name]), name
    assert 0 <= first["clip_score"] <= 100 and first["fid"] > 0
    assert first["reference_stats_cached"] is False and first["real_images_skipped"] == 1
    assert "warning: --real: 1 image(s) in real.parquet could not be read or decoded" in capsys.readouterr().err
    npz = tmp_path / first["reference_stats"]
    assert first["reference_stats"].startswith("stats/")
    with np.load(npz) as data:
        key = str(data["key"])
    assert str(tmp_path) not in key and str(world["root"]) not in key and "real.parquet@" in key
    mtime = npz.stat().st_mtime_ns

    second = run("b", 1)
    assert second["reference_stats_cached"] is True and second["reference_stats"] == first["reference_stats"]
    assert npz.stat().st_mtime_ns == mtime and second["real_images_skipped"] == 1
    for name in ("fid", "patch_fid", "clip_score"):
        assert second[name] == pytest.approx(first[name], rel=1e-4, abs=1e-4), name
    third = run("c", 1, "--reference-stats", str(npz))  # a given .npz: no real images at all
    assert third["fid"] == pytest.approx(first["fid"], rel=1e-4) and "patch_fid" not in third


# The sd15 checkpoint evaluation pool during a quick Ray training run (FID and CLIP score in MLflow at
# the checkpoints' steps, clip.png) is checked in tests/e2e/test_text2img.py::test_sd15_one_step_end_to_end.


class _Gate:
    """An evaluator that holds every evaluation until released, so the actor's queue fills."""

    def __init__(self, tracking_uri: str, run_id: str, device: str = "cpu"):
        import threading

        from dmdscale.tracking import MlflowSink

        self.sink, self.release = MlflowSink(tracking_uri, run_id), threading.Event()

    def evaluate(self, step: int, state_dict: dict, averages: dict | None = None) -> dict:
        self.release.wait(60)
        return {"step": step}


def test_a_full_queue_drops_the_oldest_waiting_checkpoint(ray_local, mlflow_uri):
    """eval.max_queued bounds the weights an actor holds: a submit to a full queue drops the
    oldest waiting checkpoint (never the one in progress), returns at once, and the drops are
    counted and logged to MLflow as eval_dropped_checkpoints."""
    import time

    import mlflow

    from dmdscale.distributed.evalpool import _EvaluationActor

    client = mlflow.MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("queue")).info.run_id
    actor = _EvaluationActor(0, 2, 2, _Gate, mlflow_uri, run_id)  # threads 2, max_queued 2
    weights = {"w": torch.zeros(2)}
    actor.submit(1, weights)
    deadline = time.monotonic() + 30
    while actor._status()["busy_step"] != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    acks = [actor.submit(step, weights) for step in (2, 3, 4, 5)]
    assert [a["dropped"] for a in acks] == [[], [], [2], [2, 3]]
    actor.evaluator.release.set()
    done = actor.wait(60)
    assert [r["step"] for r in done["results"]] == [1, 4, 5] and done["dropped"] == [2, 3]
    history = client.get_metric_history(run_id, "eval_dropped_checkpoints")
    assert [(m.step, m.value) for m in history] == [(3, 2.0)]


def test_an_evaluator_that_cannot_build_warns_and_training_does_not_wait(ray_local, capfd):
    """The actors build their evaluators while training starts: `launch` returns before they are
    ready; one that fails is a warning, and what is submitted to it comes back as None without
    raising. With wait=True (the old behaviour) the failure raises at launch."""
    import time

    from dmdscale.config import build_config
    from dmdscale.distributed.evalpool import EvaluationPool

    class _Broken:  # defined here: Ray ships it to the actor by value
        """An evaluator that cannot be built (e.g. weights that vanished after preflight)."""

        def __init__(self, device: str = "cpu"):
            raise RuntimeError("no weights here")

    cfg = build_config({}, {"eval.num_actors": 1})
    t0 = time.perf_counter()
    pool = EvaluationPool.launch(cfg, _Broken, ready_timeout=60, ack_timeout=10)
    assert time.perf_counter() - t0 < 5  # no wait for the actor to build
    deadline, err = time.monotonic() + 60, ""
    while "could not build its evaluator" not in err and time.monotonic() < deadline:
        time.sleep(0.5)
        err += capfd.readouterr().err
    assert "could not build its evaluator" in err and "no weights here" in err
    assert pool.submit(1, {"w": torch.zeros(2)}) is None
    pool.shutdown()
    with pytest.raises(Exception, match="no weights here"):
        EvaluationPool.launch(cfg, _Broken, ready_timeout=60, wait=True)
