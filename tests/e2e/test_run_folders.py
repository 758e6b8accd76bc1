"""A run folder's journal, checkpoints and train.init starts through the real command (issue 37,
items 7-11): one short quick digits run stopped after two checkpoints, then probes against
copies of its folder. Each problem is one line naming its key or file, exit 2, no retries, and
nothing of the run is lost; what can be resumed is resumed."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipelines" / "digits.py"
# Six iterations, checkpoints after 2 and 4, no evaluation while training, a small final one.
SHORT = ["train.max_steps=6", "train.checkpoint_every=2", "eval.during_training=false", "eval.num_samples=20"]
OPTIM = Path("generator") / "zero_pp_rank_0_mp_rank_00_optim_states.pt"  # a DeepSpeed file of each checkpoint


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DMDSCALE_FAIL_AT_STEP"}
    return env | {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}


def _run(out: Path, cache: Path, *args: str, env: dict[str, str] | None = None,
         timeout: float = 1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PIPELINE), "--quick", "--out", str(out), f"cache_dir={cache}", *SHORT,
                           *args], capture_output=True, text=True, timeout=timeout, cwd=out.parent,
                          env=env or _env(out.parent))


def _storage(out: Path) -> Path:
    return out / "ray" / f"digits-{out.name}"


def _checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in _storage(out).glob("checkpoint_*") if p.is_dir())


def _copy(out: Path, where: Path) -> Path:
    """A copy of run folder `out` under `where`, with the same folder name (the run's name)."""
    copy = where / out.name
    shutil.copytree(out, copy)
    return copy


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _one_line_error(proc: subprocess.CompletedProcess, *parts: str, on_workers: bool = False) -> str:
    """The command's error line, after checking it failed as a user error: exit 2, no traceback,
    no train worker started; or (`on_workers`) one attempt only, not retried, and no traceback
    of dmdscale's (Ray's own actors may log theirs on a machine shared with other clusters)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    if on_workers:
        assert proc.stderr.count("Attempting to start training worker group") == 1, proc.stderr[-5000:]
        assert "Error in training function" not in proc.stderr, proc.stderr[-5000:]
        assert not [line for line in proc.stderr.splitlines() if 'File "' in line and "dmdscale" in line], \
            proc.stderr[-5000:]
    else:
        assert "Traceback" not in proc.stderr and "RayTrainWorker" not in proc.stderr, proc.stderr[-3000:]
    line = next(line for line in proc.stderr.splitlines() if line.startswith("digits.py: error: "))
    for part in parts:
        assert part in line, line
    return line


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, digits_cache):
    """A quick run stopped for good at iteration 5 (an injected failure, no retries allowed):
    its checkpoints after 2 and 4 iterations and its journal, as a crash leaves them."""
    root = tmp_path_factory.mktemp("stopped")
    out = root / "run"
    out.mkdir()
    proc = _run(out, digits_cache, "train.max_failures=0", env=_env(root) | {"DMDSCALE_FAIL_AT_STEP": "5"})
    assert proc.returncode != 0 and "DMDSCALE_FAIL_AT_STEP=5" in proc.stderr, proc.stderr[-3000:]
    assert len(_checkpoints(out)) == 2 and (_storage(out) / "dmdscale_journal.json").is_file()
    assert not (out / "metrics.json").exists()
    return out


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, stopped_run, digits_cache):
    """The stopped run resumed by the same command after its journal and Ray's record of its
    checkpoints (checkpoint_manager_snapshot.json) were deleted: (folder, the command's output)."""
    out = _copy(stopped_run, tmp_path_factory.mktemp("resumed"))
    (_storage(out) / "dmdscale_journal.json").unlink()
    (_storage(out) / "checkpoint_manager_snapshot.json").unlink()
    return out, _run(out, digits_cache)


@pytest.mark.slow
def test_without_journal_or_rays_record_the_same_command_really_resumes(resumed_run):
    """Issue 37.8: without Ray's snapshot, training restarted from step 0 while the driver said
    "resuming it". Issue 37.7: without the journal, the checkpoints' own record of their config
    rebuilds it."""
    out, proc = resumed_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "has no run journal; rebuilt it from checkpoint_" in proc.stdout
    assert "resuming it" in proc.stdout and "resumed from the checkpoint at step 4" in proc.stdout + proc.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["resumed_from_step"] == 4 and m["steps_completed"] == 6


@pytest.mark.slow
def test_a_lost_journal_does_not_resume_the_checkpoints_under_another_config(stopped_run, digits_cache, tmp_path):
    """Issue 37.7: with the journal deleted, train.lr=1e-3 resumed the checkpoints silently."""
    out = _copy(stopped_run, tmp_path)
    (_storage(out) / "dmdscale_journal.json").unlink()
    before = [p.name for p in _checkpoints(out)]
    proc = _run(out, digits_cache, "train.lr=1e-3", timeout=600)
    _one_line_error(proc, "holds an unfinished run with a different config (train.lr)")
    assert "Started a local Ray instance" not in proc.stderr
    assert [p.name for p in _checkpoints(out)] == before and not (out / "metrics.json").exists()


@pytest.mark.slow
def test_damaged_checkpoints_stop_the_run_in_one_line_before_the_cluster(stopped_run, digits_cache, tmp_path):
    """Issue 37.9: without its checksums_rank0.json, a checkpoint with a byte-flipped DeepSpeed
    file loaded. Issue 37.10: with every checkpoint damaged, the run was retried 3 times and
    ended in a long traceback. Both are found on the driver, each bad file named, nothing deleted."""
    out = _copy(stopped_run, tmp_path)
    older, newer = _checkpoints(out)
    (newer / "checksums_rank0.json").unlink()
    for checkpoint in (older, newer):
        _flip_byte(checkpoint / OPTIM)
    proc = _run(out, digits_cache, timeout=600)
    _one_line_error(proc, "no undamaged checkpoint to resume from", f"{newer.name}: checksums_rank0.json is missing",
                    f"{older.name}: {OPTIM.as_posix()} does not match its sha256")
    assert "Started a local Ray instance" not in proc.stderr and _checkpoints(out) == [older, newer]


@pytest.mark.slow
def test_a_bad_train_init_is_one_line_before_any_training(resumed_run, digits_cache, tmp_path):
    """Issue 37.11: a truncated stage file, a truncated ema.safetensors or a student of another
    family failed on the workers, as long tracebacks retried 3 times; a stage of another
    teacher too. Each is refused on the driver, naming train.init and the file."""
    finished, _ = resumed_run
    cut = _copy(finished, tmp_path / "cut")  # the stage's EMA cut short, as an interrupted copy leaves it
    ema = cut / "stage" / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[: ema.stat().st_size // 2])
    other_teacher = _copy(finished, tmp_path / "other")  # a generator of another shape
    generator = other_teacher / "stage" / "generator.safetensors"
    weights = load_file(generator)
    weights["unet.conv_in.weight"] = weights["unet.conv_in.weight"][:8]
    save_file(weights, generator)
    other_family = _copy(finished, tmp_path / "family")  # an exported student of another family
    info = other_family / "student" / "dmdscale.json"
    info.write_text(json.dumps(json.loads(info.read_text()) | {"family": "sd15"}))
    other_head = _copy(finished, tmp_path / "head")  # a critic head of another shape: found on the workers
    critic = other_head / "stage" / "critic.safetensors"
    weights = load_file(critic)
    head = next(k for k in weights if k.startswith("head.") and weights[k].ndim >= 1 and len(weights[k]) > 1)
    weights[head] = weights[head][:1]
    save_file(weights, critic)
    proc = _run(tmp_path / "stage2-head", digits_cache, f"train.init={other_head}", timeout=900)
    _one_line_error(proc, f"train.init: the critic weights in {other_head} do not fit this run's critic", on_workers=True)
    cases = {"cut": (cut, [f"train.init: {ema} is damaged or cut short"]),
             "shape": (other_teacher, [f"train.init: {generator} does not fit this run's generator",
                                       "unet.conv_in.weight"]),
             "family": (other_family / "student", ["train.init:", "holds a sd15 student (dmdscale.json says so)"])}
    for name, (start, parts) in cases.items():
        out = tmp_path / f"stage2-{name}"
        out.mkdir()
        _one_line_error(_run(out, digits_cache, f"train.init={start}", timeout=600), *parts)
        assert not _checkpoints(out)
