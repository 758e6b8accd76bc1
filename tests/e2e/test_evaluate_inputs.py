"""`python -m dmdscale.evaluate` refuses bad inputs before it generates anything: a missing,
corrupt or other-resolution reference .npz, real images none of which decode, a digits student,
an actor count the cluster cannot hold. Each is one line naming the flag or file, exit 2, no
traceback. The file checks run before Ray starts: these runs point RAY_ADDRESS at a port nobody
listens on, so a check that came after the cluster (and so after generation) would show the
RAY_ADDRESS error instead of its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import exported_text_student, free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [f"a handwritten digit {i}" for i in range(4)]


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory):
    """An exported 1-step student (the tiny teacher's own UNet), a tiny CLIP, a prompt file."""
    world = exported_text_student(tiny, tmp_path_factory.mktemp("evaluate-inputs"), PROMPTS)
    return world | {"student": str(world["student"]), "prompts": str(world["prompts"])}


def evaluate(world: dict, tmp_path: Path, *args: str, ray_address: str | None = None,
             timeout: float = 120) -> subprocess.CompletedProcess:
    """The command on the tiny student (CLIP features, 32 px); RAY_ADDRESS: a dead port unless given."""
    env = {**os.environ, "RAY_ADDRESS": ray_address or f"127.0.0.1:{free_port()}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "dmdscale.evaluate", "--student", world["student"], "--prompts", world["prompts"],
           "--out", str(tmp_path / "out"), "--resolution", "32", "--fid-features", "clip",
           "--clip-model", world["clip"], "--cache-dir", str(tmp_path / "stats"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path)


def one_line_error(proc: subprocess.CompletedProcess, *expected: str) -> str:
    """The run ended with exit 2 and one error line holding `expected`, before any Ray or generation."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "RAY_ADDRESS" not in errors[0], f"checked only after Ray started (i.e. after generation): {errors[0]}"
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def test_a_missing_or_corrupt_reference_npz_fails_before_generation(world, tmp_path):
    one_line_error(evaluate(world, tmp_path, "--reference-stats", "missing.npz"), "--reference-stats", "missing.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"not an npz at all")
    one_line_error(evaluate(world, tmp_path, "--reference-stats", "corrupt.npz"), "--reference-stats", "corrupt.npz")
    assert not (tmp_path / "out").exists()


def test_reference_statistics_at_another_resolution_are_refused(world, tmp_path):
    """An .npz this command wrote at 64 px, given to a 32 px evaluation: one line naming the file and both."""
    import numpy as np

    from dmdscale.eval.reference import fid_extractor_id
    from dmdscale.eval.text import reference_stats

    key = {"source": "real", "resolution": 64, "extractor": fid_extractor_id("clip", world["clip"]),
           "patch_size": None}
    _, npz, _ = reference_stats(key, tmp_path / "given", lambda: np.random.RandomState(0).randn(10, 4))
    line = one_line_error(evaluate(world, tmp_path, "--reference-stats", str(npz)), str(npz), "64", "32")
    assert "resolution" in line


def test_real_images_none_of_which_decode_fail_before_generation(world, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    for i in range(3):
        (real / f"img_{i}.png").write_bytes(b"truncated garbage")
    one_line_error(evaluate(world, tmp_path, "--real", str(real)), "--real", str(real))


def test_a_digits_student_is_named_by_its_family(world, tmp_path):
    """A dmdscale student of a family that is not text-to-image: said so, not "give a dmdscale student"."""
    student = tmp_path / "digits-student"
    (student / "unet").mkdir(parents=True)
    (student / "dmdscale.json").write_text(json.dumps({"timesteps": [999], "call": {}, "family": "unet2d"}))
    proc = evaluate({**world, "student": str(student)}, tmp_path)
    line = one_line_error(proc, "--student", "unet2d", "not a text-to-image")
    assert "give the student/ folder" not in line


def test_an_actor_count_below_one_is_refused_by_the_parser(world, tmp_path):
    proc = evaluate(world, tmp_path, "--num-actors", "0")
    one_line_error(proc, "--num-actors", "0")


def test_more_actors_than_the_cluster_holds_is_one_line_not_a_hang(world, tmp_path):
    """On a fresh local cluster (nothing can add nodes) 1000 actors can never be placed: one line
    naming --num-actors and what the cluster holds, at once (it waited forever)."""
    proc = evaluate(world, tmp_path, "--num-actors", "1000", ray_address="local", timeout=float(os.environ.get("EVAL_HANG_TIMEOUT", 240)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = [line for line in proc.stderr.splitlines() if "error:" in line][-1]
    assert "--num-actors 1000" in line and "CPU" in line and "the Ray cluster has" in line, line
    assert not (tmp_path / "out").exists()
