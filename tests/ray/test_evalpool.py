"""Checkpoint evaluation on Ray actors: real Ray, real MLflow (sqlite), real clean-fid.

One pool of two actors serves the whole module (actor start-up dominates on 2 CPUs); each
test submits its own steps and looks only at those.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from mlflow import MlflowClient
from PIL import Image

from dmdscale.config import build_config
from dmdscale.core.sampling import sample
from dmdscale.data.sources import build_digits_parquet, load_arrays
from dmdscale.distributed.evalpool import EvaluationPool
from dmdscale.eval.checkpoints import GRID_ARTIFACT_DIR
from dmdscale.families.unet2d.evaluator import CheckpointEvaluator, eval_spec
from dmdscale.eval.metrics import (
    class_accuracy,
    compute_fid,
    generate,
    sample_quality_of,
    sample_student,
    train_classifier,
)
from dmdscale.families.unet2d.model import load_unet, tiny_unet_config
from dmdscale.families.unet2d.teacher import ddpm_scheduler, save_teacher


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Teacher folder, held-out digits, a briefly trained classifier, config, MLflow run."""
    root = tmp_path_factory.mktemp("evalpool")
    torch.manual_seed(0)
    teacher_dir = save_teacher(UNet2DModel(**tiny_unet_config(16, 1, 10, width=8)), ddpm_scheduler(),
                               root / "teacher")
    paths = build_digits_parquet(root / "digits")
    train_x, train_y, _ = load_arrays(paths["train"], 16, 1, require_labels=True)
    real, _, _ = load_arrays(paths["test"], 16, 1, require_labels=True)
    clf = train_classifier(train_x, train_y, steps=150, progress=False)
    cfg = build_config(overrides={"eval.num_samples": 100, "eval.num_actors": 2, "eval.actor_cpus": 0.25})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("evalpool")).info.run_id
    # 200 of the 360 held-out digits: clean-fid's 299x299 resizing dominates an evaluation.
    return {"root": root, "teacher_dir": teacher_dir, "real": real[:200], "clf": clf, "cfg": cfg,
            "uri": uri, "client": client, "run_id": run_id}


@pytest.fixture(scope="module")
def pool(ray_local, world):
    build = functools.partial(load_unet, str(world["teacher_dir"]))
    p = EvaluationPool.launch(world["cfg"], CheckpointEvaluator, build, eval_spec(world["cfg"]), world["real"],
                              world["clf"], world["uri"], world["run_id"])
    yield p
    p.shutdown()


def weights(world, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """The teacher's weights perturbed by seeded noise: a distinct 'checkpoint' per seed."""
    sd = load_unet(world["teacher_dir"]).state_dict()
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) * v.std().nan_to_num(0)
            if v.is_floating_point() and v.numel() > 1 else v for k, v in sd.items()}


def _for(results: list[dict], *steps: int) -> list[dict]:
    return [r for r in results if r["step"] in steps]


def _history(world, name: str) -> dict[int, float]:
    return {m.step: m.value for m in world["client"].get_metric_history(world["run_id"], name)}


def test_submit_returns_at_once_and_drain_collects_logged_results(pool, world, tmp_path):
    ack10 = pool.submit(10, weights(world, 10))
    # Acknowledged while its evaluation is still queued or running: no result exists yet.
    assert ack10["queued"] and ack10["pending"] >= 1
    assert _for(pool.results(), 10) == []
    ack20 = pool.submit(20, weights(world, 20))
    assert ack20["queued"] and {ack10["actor"], ack20["actor"]} == {0, 1}  # round robin
    assert _for(pool.results(), 20) == []

    results = _for(pool.drain(), 10, 20)
    print("evaluation seconds:", [round(r["seconds"], 1) for r in results])
    assert [r["step"] for r in results] == [10, 20]
    for r in results:
        assert "error" not in r and "tracking_error" not in r, r
        assert math.isfinite(r["fid_student"]) and r["fid_student"] > 0
        assert 0.0 <= r["class_accuracy_student"] <= 1.0 and r["seconds"] > 0
    assert results[0]["fid_student"] != results[1]["fid_student"]  # different weights

    fid = _history(world, "fid_student")
    acc = _history(world, "class_accuracy_student")
    assert {s: fid[s] for s in (10, 20)} == {r["step"]: r["fid_student"] for r in results}
    assert {s: acc[s] for s in (10, 20)} == {r["step"]: r["class_accuracy_student"] for r in results}
    grids = {a.path for a in world["client"].list_artifacts(world["run_id"], GRID_ARTIFACT_DIR)}
    assert {f"{GRID_ARTIFACT_DIR}/step_0000010.png", f"{GRID_ARTIFACT_DIR}/step_0000020.png"} <= grids
    local = world["client"].download_artifacts(world["run_id"], f"{GRID_ARTIFACT_DIR}/step_0000020.png",
                                               str(tmp_path))
    with Image.open(local) as im:
        assert im.format == "PNG" and im.size[0] >= 10 * 16 * 3  # 10 enlarged digits per row


def test_actor_fid_equals_the_final_evaluation_code_path(pool, world, tmp_path):
    """The curve ends where the final figure is: same labels, noise, extractor, FID code."""
    w = weights(world, 60)
    pool.submit(60, w)
    [result] = _for(pool.drain(), 60)

    cfg = world["cfg"]
    n, c, r = cfg.eval.num_samples, cfg.data.channels, cfg.data.resolution
    labels = np.arange(n) % cfg.data.num_classes
    student = load_unet(world["teacher_dir"])
    student.load_state_dict(w)
    # As UNet2DFamily.evaluate (dmdscale.families.unet2d) samples and scores the student.
    images = generate(lambda z, y: sample(student, student.schedule, z, cfg.generator.timesteps, y),
                      labels, (c, r, r), cfg.train.seed + 99)
    fid = compute_fid(images, world["real"], world["clf"])
    print(f"actor FID {result['fid_student']:.6f} in-process {fid:.6f}")
    assert result["fid_student"] == pytest.approx(fid, rel=1e-6)
    assert result["class_accuracy_student"] == class_accuracy(world["clf"], images, labels)
    # The sample quality figures too: the same call, the same keys, the same numbers.
    quality = sample_quality_of("student", world["real"], images, world["clf"], cfg.train.seed + 99)
    assert {"swd_pixels_student", "recall_pixels_student", "recall_classifier_student",
            "coverage_classifier_student"} <= quality.keys()
    for key, value in quality.items():
        assert result[key] == pytest.approx(value, rel=1e-9, nan_ok=True), key
    logged = _history(world, "swd_pixels_student")
    assert logged[60] == pytest.approx(result["swd_pixels_student"])
    # The helper the actors sample with gives these very images for a one-step student.
    spec = eval_spec(cfg)
    assert np.array_equal(sample_student(student, spec["timesteps"], spec["labels"], spec["shape"],
                                         spec["seed"]), images)


def test_failing_evaluation_is_reported_and_the_actor_goes_on(pool, world):
    bad = {k: torch.zeros(3) for k in weights(world, 0)}  # every shape wrong
    ack_bad = pool.submit(30, bad)
    acks = [pool.submit(s, weights(world, s)) for s in (40, 50)]  # round robin: one lands on the same actor
    results = {r["step"]: r for r in _for(pool.drain(), 30, 40, 50)}
    assert "size mismatch" in results[30]["error"] and results[30]["fid_student"] is None
    [same] = [results[a["step"]] for a in acks if a["actor"] == ack_bad["actor"]]
    assert same["actor"] == results[30]["actor"] and "error" not in same
    assert math.isfinite(same["fid_student"])
    assert 30 not in _history(world, "fid_student") and {40, 50} <= set(_history(world, "fid_student"))


def test_submission_from_another_ray_task_survives_its_process(pool, world, ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def rank0(p: EvaluationPool, step: int, w: dict) -> dict:
        return p.submit(step, w)  # the pool arrived pickled, as in train_loop_config

    @ray.remote(num_cpus=0, max_retries=0)
    def rank0_then_dies(p: EvaluationPool, step: int, w: dict) -> None:
        assert p.submit(step, w)["queued"]
        os._exit(1)  # the process that put the weights (their owner) is gone before evaluation

    ack = ray.get(rank0.remote(pool, 70, weights(world, 70)))
    assert ack["queued"] and ack["step"] == 70
    # A restarted rank 0 resubmitting a step: each pickled copy round-robins from the same
    # position, so it reaches the same actor, which does not evaluate the step twice.
    again = ray.get(rank0.remote(pool, 70, weights(world, 70)))
    assert again["actor"] == ack["actor"] and not again["queued"]
    with pytest.raises(ray.exceptions.RayError):
        ray.get(rank0_then_dies.remote(pool, 80, weights(world, 80)))
    results = {r["step"]: r for r in _for(pool.drain(), 70, 80)}
    assert sorted(results) == [70, 80]  # 70 once
    assert all("error" not in r and math.isfinite(r["fid_student"]) for r in results.values()), results
    assert {70, 80} <= set(_history(world, "fid_student"))


def test_tracking_failure_is_a_warning_not_an_error(world, capsys):
    spec = eval_spec(world["cfg"]) | {"labels": np.arange(20) % 10}  # in-process: keep it small
    ev = CheckpointEvaluator(functools.partial(load_unet, str(world["teacher_dir"])), spec,
                             world["real"][:40], world["clf"], world["uri"], "no-such-run")
    result = ev.evaluate(5, weights(world, 5))
    assert "error" not in result and math.isfinite(result["fid_student"])
    assert "metrics" in result["tracking_error"] and "warning: MLflow logging" in capsys.readouterr().err
