"""Checkpoints: DeepSpeed engine state round trips (ZeRO-2, ZeRO-3 + CPU offload) through
weights-only loading, refusal of pickled code, checksums and the fall-back to the previous good
checkpoint, data positions, and the run journal."""
import contextlib
import json
import os
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import pyarrow.fs
import pytest
import torch

from dmdscale.config import ConfigError, build_config
from dmdscale.core.sampling import NoiseStream
from dmdscale.core.schedule import NoiseSchedule
from dmdscale.distributed.checkpoint import (
    CorruptCheckpoint,
    DataPosition,
    RunJournal,
    TrainingState,
    checkpoints_before,
    load_latest_good,
    load_training_state,
    parse_fail_at_step,
    rng_states,
    save_training_state,
    set_rng_states,
)
from dmdscale.distributed.engine import DeepSpeedOptimizedModule
from dmdscale.models.toy2d import MLPDenoiser


def _engine(cfg, seed):
    torch.manual_seed(seed)
    return DeepSpeedOptimizedModule(MLPDenoiser(NoiseSchedule.ddpm(), 2, 16, 2), cfg.train, cfg.scale, 8, role="generator")


def _train(engine, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, t = torch.randn(8, 2, generator=g), torch.randint(0, 1000, (8,), generator=g)
        engine.backward(engine.module(x, t, None).pow(2).mean())
        engine.step()


@pytest.mark.slow
@pytest.mark.parametrize("stage, offload", [(2, False), (3, True)])
def test_engine_state_round_trips_and_training_continues_identically(tmp_path, stage, offload):
    cfg = build_config({}, {"scale.zero_stage": stage, "scale.offload_optimizer": offload,
                            "train.warmup_steps": 4, "train.lr": 1e-2})
    a = _engine(cfg, 0)
    _train(a, 3, seed=1)
    step_rng = NoiseStream(torch.Generator().manual_seed(5))
    step_rng.randn((4, 2), "cpu", torch.float32)
    save_training_state(tmp_path, TrainingState(3, 1, 2), {"generator": a}, rng_states(step_rng), rank=0)
    listed = json.loads((tmp_path / "checksums_rank0.json").read_text())["files"]
    assert any(name.startswith("generator/") and name.endswith(".pt") for name in listed)
    assert {"rng_rank0.safetensors", "training_state_rank0.json"} <= set(listed)

    b = _engine(cfg, 123)  # different initial weights, fresh optimizer
    other_rng = NoiseStream(torch.Generator().manual_seed(99))
    state, rngs = load_training_state(tmp_path, {"generator": b}, rank=0)
    set_rng_states(rngs, other_rng)
    assert state == TrainingState(3, 1, 2)
    assert torch.equal(other_rng.randn((4, 2), "cpu", torch.float32), step_rng.randn((4, 2), "cpu", torch.float32))
    assert all(torch.equal(v, b.full_state_dict()[k]) for k, v in a.full_state_dict().items())
    # Optimizer moments and the warm-up position came back too: the next steps match exactly.
    _train(a, 2, seed=2)
    _train(b, 2, seed=2)
    for k, v in a.full_state_dict().items():
        torch.testing.assert_close(b.full_state_dict()[k], v, rtol=1e-6, atol=1e-7)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.slow
def test_a_checkpoint_that_carries_code_is_refused_not_run(tmp_path, monkeypatch):
    cfg = build_config({}, {"scale.zero_stage": 2})
    a = _engine(cfg, 0)
    _train(a, 1, seed=1)
    a.save(tmp_path, "generator")
    optim = next((tmp_path / "generator").glob("*optim_states.pt"))
    torch.save({"payload": _RunsCode()}, optim)
    assert zipfile.is_zipfile(optim) or optim.stat().st_size > 0
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pickle.UnpicklingError):
        a.load(tmp_path, "generator")
    assert not (tmp_path / "pwned").exists()


def test_missing_rank_files_name_the_cause(tmp_path):
    with pytest.raises(FileNotFoundError, match="scale.num_workers"):
        load_training_state(tmp_path, {}, rank=1)
    (tmp_path / "train_metrics.json").write_text("{}")  # a finished run's final checkpoint
    with pytest.raises(FileNotFoundError, match="finished run"):
        load_training_state(tmp_path, {}, rank=0)


def test_data_position_counts_consumed_batches_across_epochs():
    pos = DataPosition(epoch=2, batch=3)
    pos.consumed = 4
    assert pos.now() == (2, 7)  # epoch length not known yet: still in the first epoch
    pos.epoch_length = 5  # the reader finished an epoch of 5 batches
    assert pos.now() == (3, 2)
    pos.consumed = 12
    assert pos.now() == (5, 0)


def test_fail_at_step_is_validated():
    assert parse_fail_at_step(None) is None and parse_fail_at_step("") is None
    assert parse_fail_at_step("12") == 12
    for bad in ("x", "-1", "1.5"):
        with pytest.raises(ValueError, match="DMDSCALE_FAIL_AT_STEP"):
            parse_fail_at_step(bad)


# -- checksums and the fall-back to the previous good checkpoint --------------------------------
class _FileModule:
    """A Checkpointable that writes one file per rank under its tag, and records loads."""

    def __init__(self, rank=0, payload=b"weights"):
        self.rank, self.payload, self.loaded = rank, payload, []

    def save(self, directory, tag):
        (Path(directory) / tag).mkdir(exist_ok=True)
        (Path(directory) / tag / f"part_rank{self.rank}.bin").write_bytes(self.payload * 100)

    def load(self, directory, tag):
        self.loaded.append((Path(directory), tag))


def _save(folder, step, ranks=1):
    """A checkpoint as Ray leaves it in storage: each rank saved into its own folder, merged."""
    for rank in range(ranks):
        own = folder.parent / f"{folder.name}_rank{rank}_local"
        own.mkdir(parents=True)
        save_training_state(own, TrainingState(step), {"generator": _FileModule(rank)},
                            {"torch": torch.zeros(3)}, rank=rank, world_size=ranks)
        shutil.copytree(own, folder, dirs_exist_ok=True)
        shutil.rmtree(own)
    return folder


def _flip_byte(path, at=10):
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_each_rank_writes_checksums_of_its_files_and_a_merged_checkpoint_verifies(tmp_path):
    folder = _save(tmp_path / "checkpoint_a", step=4, ranks=2)
    record = json.loads((folder / "checksums_rank1.json").read_text())
    assert record["world_size"] == 2
    assert set(record["files"]) == {"generator/part_rank1.bin", "rng_rank1.safetensors", "training_state_rank1.json"}
    assert record["files"]["generator/part_rank1.bin"]["size"] == 700
    module = _FileModule(rank=1)
    state, rngs = load_training_state(folder, {"generator": module}, rank=1)
    assert state.step == 4 and torch.equal(rngs["torch"], torch.zeros(3)) and module.loaded


@pytest.mark.parametrize("damage, problem", [
    (lambda f: _flip_byte(f / "generator" / "part_rank1.bin"), "generator/part_rank1.bin does not match its sha256"),
    (lambda f: (f / "generator" / "part_rank1.bin").write_bytes(b"short"), "generator/part_rank1.bin has 5 bytes"),
    (lambda f: (f / "rng_rank0.safetensors").unlink(), "rng_rank0.safetensors is missing"),
    (lambda f: (f / "checksums_rank1.json").unlink(), "checksums_rank1.json is missing"),
    (lambda f: (f / "checksums_rank0.json").write_text('{"world_'), "checksums_rank0.json is unreadable"),
], ids=["flipped byte", "truncated", "deleted", "a rank's checksums missing", "checksums damaged"])
def test_a_damaged_file_of_any_rank_is_named_before_any_module_loads(tmp_path, damage, problem):
    folder = _save(tmp_path / "checkpoint_a", step=4, ranks=2)
    damage(folder)
    module = _FileModule(rank=0)
    with pytest.raises(CorruptCheckpoint, match=re.escape(f"checkpoint {folder} is damaged: {problem}")):
        load_training_state(folder, {"generator": module}, rank=0)  # rank 0 sees rank 1's damage too
    assert module.loaded == []  # verified before loading: nothing half loaded


def test_a_checkpoint_without_checksums_loads_as_before(tmp_path):
    folder = _save(tmp_path / "checkpoint_a", step=7)
    (folder / "checksums_rank0.json").unlink()
    _flip_byte(folder / "generator" / "part_rank0.bin")  # nothing to check it against
    assert load_training_state(folder, {"generator": _FileModule()}, rank=0)[0].step == 7


@contextlib.contextmanager
def _as_directory(path):
    yield str(path)


class _Checkpoint:
    """What load_latest_good needs of a ray.train.Checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def as_directory(self):
        return _as_directory(self.path)


def _load_step(directory):
    return load_training_state(directory, {"generator": _FileModule()}, rank=0)[0].step


def test_resume_falls_back_to_the_newest_good_checkpoint_and_warns_naming_the_bad_file(tmp_path, capsys):
    run = tmp_path / "run"
    for name, step in [("checkpoint_2025-01-01_10-00-00.000001", 2), ("checkpoint_2025-01-01_10-00-00.000002", 4),
                       ("checkpoint_2025-01-01_10-00-01.000000", 6)]:
        _save(run / name, step)
    (run / "checkpoint_2025-01-01_10-00-02.000000").mkdir()  # an upload after the latest, never registered
    latest = run / "checkpoint_2025-01-01_10-00-01.000000"
    _flip_byte(latest / "generator" / "part_rank0.bin")
    fs = pyarrow.fs.LocalFileSystem()
    older = checkpoints_before(fs, str(latest))
    assert [Path(p).name for p in older] == ["checkpoint_2025-01-01_10-00-00.000002", "checkpoint_2025-01-01_10-00-00.000001"]

    candidates = [_Checkpoint(latest), *(_Checkpoint(p) for p in older)]
    assert load_latest_good(candidates, _load_step) == 4
    warning = capsys.readouterr().err
    assert f"checkpoint {latest} is damaged (generator/part_rank0.bin does not match its sha256" in warning


def test_when_every_checkpoint_is_damaged_the_error_names_each_bad_file(tmp_path, capsys):
    run = tmp_path / "run"
    first, second = _save(run / "checkpoint_1", 2), _save(run / "checkpoint_2", 4)
    _flip_byte(first / "training_state_rank0.json", at=2)
    (second / "rng_rank0.safetensors").unlink()
    with pytest.raises(CorruptCheckpoint) as caught:
        load_latest_good([_Checkpoint(second), _Checkpoint(first)], _load_step)
    message = str(caught.value)
    assert f"{second}: rng_rank0.safetensors is missing" in message
    assert f"{first}: training_state_rank0.json does not match its sha256" in message
    assert f"delete the run folder {run} (or use another --out)" in message


def test_other_load_errors_are_not_taken_for_damage(tmp_path):
    finished = tmp_path / "checkpoint_9"
    finished.mkdir()
    (finished / "train_metrics.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="finished run"):
        load_latest_good([_Checkpoint(finished), _Checkpoint(_save(tmp_path / "checkpoint_1", 2))], _load_step)


# -- the run journal ----------------------------------------------------------------------------
def test_run_journal_resumes_same_config_refuses_another_and_restarts_after_finish(tmp_path):
    journal = RunJournal.at(str(tmp_path), "run")
    cfg = build_config({}).flat()
    assert journal.begin(cfg) == "new"
    assert journal.record_start(0) == 0 and journal.record_start(10) == 1
    assert journal.mark_once("failed_at_step_12") and not journal.mark_once("failed_at_step_12")
    longer = cfg | {"train.max_steps": 5000}  # resuming with more steps is allowed
    assert journal.begin(longer) == "resume"
    (tmp_path / "run" / "checkpoint_x").mkdir()
    with pytest.raises(ConfigError, match="unfinished run with a different config \\(train.lr\\)"):
        journal.begin(cfg | {"train.lr": 1.0})
    journal.mark_finished()
    assert journal.begin(cfg) == "new"  # a finished run's folder is cleared for the new one
    assert not (tmp_path / "run" / "checkpoint_x").exists()
    assert journal.read()["starts"] == []
    assert isinstance(journal.fs, pyarrow.fs.FileSystem)


def test_a_run_that_never_checkpointed_is_replaced_by_another_config(tmp_path, capsys):
    journal = RunJournal.at(str(tmp_path), "run")
    cfg = build_config({}).flat()
    assert journal.begin(cfg) == "new"
    journal.record_start(0)  # started, failed before its first checkpoint
    assert journal.begin(cfg | {"train.lr": 1.0}) == "new"
    assert "(train.lr) that wrote no checkpoint" in capsys.readouterr().out
    data = journal.read()
    assert data["config"]["train.lr"] == 1.0 and data["starts"] == []


def test_journal_writes_leave_no_temp_files_and_a_damaged_journal_is_named(tmp_path):
    journal = RunJournal.at(str(tmp_path), "run")
    journal.begin(build_config({}).flat())
    journal.record_start(0)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["dmdscale_journal.json"]
    text = (tmp_path / "run" / "dmdscale_journal.json").read_text()
    (tmp_path / "run" / "dmdscale_journal.json").write_text(text[: len(text) // 2])  # cut mid-write
    with pytest.raises(ConfigError, match=re.escape(f"run journal {journal.path} is damaged (") + ".*delete the run folder"):
        journal.read()


def test_a_trained_run_whose_evaluation_failed_is_evaluated_again(tmp_path):
    journal = RunJournal.at(str(tmp_path), "run")
    cfg = build_config({}).flat()
    journal.begin(cfg)
    journal.record_start(0)
    (tmp_path / "run" / "checkpoint_final").mkdir()
    journal.mark_trained()
    assert journal.begin(cfg) == "evaluate"
    eval_key = next(k for k in cfg if k.startswith("eval."))
    assert journal.begin(cfg | {eval_key: "changed"}) == "evaluate"
    for training_key in ("train.lr", "train.max_steps"):  # the trained student has the recorded ones
        with pytest.raises(ConfigError, match=f"trained run whose final evaluation did not finish.*{training_key}"):
            journal.begin(cfg | {training_key: 12345})
    journal.mark_finished()
    assert journal.begin(cfg) == "new"
