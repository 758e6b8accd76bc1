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
from safetensors.torch import load_file, save_file

from dmdscale.config import ConfigError, build_config
from dmdscale.errors import UserError
from dmdscale.core.sampling import NoiseStream
from dmdscale.core.schedule import NoiseSchedule
from dmdscale.distributed.checkpoint.faults import parse_fail_at_step
from dmdscale.distributed.checkpoint.integrity import CorruptCheckpoint, checkpoints_before, load_latest_good, verify_checkpoint
from dmdscale.distributed.checkpoint.journal import RunJournal
from dmdscale.distributed.checkpoint.state import (
    DataPosition,
    TrainingState,
    load_training_state,
    rng_states,
    save_run_config,
    save_training_state,
    set_rng_states,
)
from dmdscale.distributed.engine import DeepSpeedOptimizedModule
from dmdscale.families.toy2d.model import MLPDenoiser


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


def _as_format_1(folder, rank=0):
    """The checkpoint as dmdscale wrote it before checksums: no checksums, no format marks."""
    (folder / f"checksums_rank{rank}.json").unlink()
    state = json.loads((folder / f"training_state_rank{rank}.json").read_text())
    del state["format"]
    (folder / f"training_state_rank{rank}.json").write_text(json.dumps(state))
    rng = folder / f"rng_rank{rank}.safetensors"
    save_file(load_file(rng), rng)  # without the metadata


def test_a_checkpoint_of_the_format_before_checksums_loads_as_before(tmp_path):
    folder = _save(tmp_path / "checkpoint_a", step=7)
    _as_format_1(folder)
    _flip_byte(folder / "generator" / "part_rank0.bin")  # nothing to check it against
    assert load_training_state(folder, {"generator": _FileModule()}, rank=0)[0].step == 7


@pytest.mark.parametrize("also_deleted", [None, "training_state_rank0.json", "rng_rank0.safetensors"])
def test_a_checkpoint_of_this_format_without_its_checksums_is_damaged_not_unchecked(tmp_path, also_deleted):
    """Issue 37.9: deleting checksums_rank0.json turned verification off, and a byte-flipped
    file loaded without error. Its state file and its RNG file each say it was written with
    checksums, so deleting one of them too still leaves the mark."""
    folder = _save(tmp_path / "checkpoint_a", step=7)
    (folder / "checksums_rank0.json").unlink()
    if also_deleted:
        (folder / also_deleted).unlink()
    _flip_byte(folder / "generator" / "part_rank0.bin")
    marked_by = "rng_rank0.safetensors" if also_deleted == "training_state_rank0.json" else "training_state_rank0.json"
    module = _FileModule()
    with pytest.raises(CorruptCheckpoint, match=re.escape(
            f"checksums_rank0.json is missing ({marked_by} says this checkpoint was written with checksums)")):
        load_training_state(folder, {"generator": module}, rank=0)
    assert module.loaded == []
    # A rank's checksums missing among others' (2 ranks) is named the same way.
    two = _save(tmp_path / "checkpoint_b", step=7, ranks=2)
    (two / "checksums_rank0.json").unlink()
    with pytest.raises(CorruptCheckpoint, match="checksums_rank0.json is missing"):
        verify_checkpoint(two)


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
    with pytest.raises(ConfigError, match=re.escape(f"run journal {journal.path} is damaged (") +
                       ".*move it aside \\(or delete that file only\\).*checkpoints kept"):
        journal.read()


def _checkpoint_of(run, name, config, step=4, final=False):
    """A checkpoint folder of run `run` written under `config` (rank 0, as the workers write them)."""
    folder = run / name
    if final:  # the final checkpoint: the student and figures, and the config
        folder.mkdir(parents=True)
        (folder / "train_metrics.json").write_text("{}")
        save_run_config(folder, config)
        return folder
    own = run / f"{name}_local"
    own.mkdir(parents=True)
    save_training_state(own, TrainingState(step), {"generator": _FileModule()}, {"torch": torch.zeros(3)},
                        rank=0, world_size=1, config=config)
    shutil.copytree(own, folder)
    shutil.rmtree(own)
    return folder


def test_a_lost_journal_is_rebuilt_from_the_checkpoints_and_refuses_another_config(tmp_path, capsys):
    """Issue 37.7: with the journal deleted, a rerun under another config resumed the checkpoints
    silently. They record the config they were written under: the same command rebuilds the
    journal and resumes, another config is refused naming its keys, and nothing is deleted."""
    journal = RunJournal.at(str(tmp_path), "run")
    cfg = json.loads(json.dumps(build_config({}).flat(), default=str))
    assert journal.begin(cfg) == "new"
    journal.record_start(0)
    run = tmp_path / "run"
    older, newer = _checkpoint_of(run, "checkpoint_1", cfg, 2), _checkpoint_of(run, "checkpoint_2", cfg, 4)
    (run / "dmdscale_journal.json").unlink()
    with pytest.raises(ConfigError, match=r"unfinished run with a different config \(train.lr\)") as refused:
        journal.begin(cfg | {"train.lr": 1.0})
    assert f"resume it with the same config (train.lr={json.dumps(cfg['train.lr'])})" in str(refused.value)
    assert older.is_dir() and newer.is_dir() and load_training_state(newer, {}, rank=0)[0].step == 4
    (run / "dmdscale_journal.json").unlink()
    assert journal.begin(cfg | {"train.max_steps": 99}) == "resume"  # a resumable change
    assert "no run journal; rebuilt it from checkpoint_2" in capsys.readouterr().out
    assert journal.read()["config"] == cfg and journal.begin(cfg) == "resume"
    # A damaged journal, moved aside as its message says: the same.
    (run / "dmdscale_journal.json").write_text("{")
    with pytest.raises(ConfigError, match="move it aside"):
        journal.begin(cfg)
    (run / "dmdscale_journal.json").rename(run / "journal.bad")
    assert journal.begin(cfg) == "resume"


def test_a_lost_journal_of_a_trained_run_evaluates_and_unrecorded_checkpoints_are_refused(tmp_path):
    cfg = json.loads(json.dumps(build_config({}).flat(), default=str))
    journal = RunJournal.at(str(tmp_path / "a"), "run")
    _checkpoint_of(tmp_path / "a" / "run", "checkpoint_1", cfg, 2)
    _checkpoint_of(tmp_path / "a" / "run", "checkpoint_2", cfg, final=True)
    assert journal.begin(cfg) == "evaluate"  # training finished: only its evaluation is redone
    # Checkpoints written before they recorded a config: resuming them under an unknown one
    # could mix two runs, so they are refused (and kept).
    journal = RunJournal.at(str(tmp_path / "b"), "run")
    (tmp_path / "b" / "run" / "checkpoint_1").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds checkpoints but no run journal .*do not record the config"):
        journal.begin(cfg)
    assert (tmp_path / "b" / "run" / "checkpoint_1").is_dir()


def test_the_driver_finds_the_newest_good_checkpoint_and_stops_when_none_is(tmp_path):
    """Issue 37.10: with every checkpoint damaged, the run retried 3 times and ended in a long
    traceback. The driver verifies them first (local storage): a user error naming each bad file."""
    cfg = json.loads(json.dumps(build_config({}).flat(), default=str))
    run = tmp_path / "run"
    journal = RunJournal.at(str(tmp_path), "run")
    assert journal.resume_point() is None
    first, second = _checkpoint_of(run, "checkpoint_1", cfg, 2), _checkpoint_of(run, "checkpoint_2", cfg, 4)
    _flip_byte(second / "generator" / "part_rank0.bin")
    assert journal.resume_point() == str(first)
    (first / "checksums_rank0.json").unlink()  # issue 37.9: not a way around verification
    with pytest.raises(CorruptCheckpoint) as caught:
        journal.resume_point()
    assert isinstance(caught.value, UserError)
    message = str(caught.value)
    assert "\n" not in message and "checksums_rank0.json is missing" in message and "part_rank0.bin" in message
    assert first.is_dir() and second.is_dir()
    # Remote storage: the newest, unverified here (the workers verify and fall back the same way).
    remote = RunJournal(pyarrow.fs.SubTreeFileSystem(str(tmp_path), pyarrow.fs.LocalFileSystem()), "run")
    assert remote.resume_point() == "run/checkpoint_2"


def test_a_user_error_on_a_worker_is_not_retried_other_failures_are():
    """Ray Train's failure policy retried a damaged checkpoint or a bad train.init (max_failures
    times); the run's policy raises a user error at once, wherever Ray carries it."""
    from ray.train import FailureConfig
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2.api.exceptions import WorkerGroupError

    from dmdscale.distributed.launch import trainer_class, user_errors_fail

    policy = user_errors_fail()(FailureConfig(max_failures=3))
    wrapped = RuntimeError("while resuming")
    wrapped.__cause__ = ConfigError("train.init: x does not fit")
    for error in (CorruptCheckpoint("no undamaged checkpoint"), wrapped):
        assert policy.make_decision(WorkerGroupError("e", {0: RuntimeError("peer"), 1: error})) == FailureDecision.RAISE
    assert policy.make_decision(WorkerGroupError("e", {0: RuntimeError("a crash")})) == FailureDecision.RETRY
    from ray.train.torch import TorchTrainer

    assert issubclass(trainer_class(), TorchTrainer)


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


# -- train.init: checked on the driver, before any cluster work (issue 37.11) -------------------
def _teacher(path, width=8):
    from diffusers import UNet2DModel

    from dmdscale.families.unet2d.model import tiny_unet_config

    unet = UNet2DModel(**tiny_unet_config(16, 1, 10, width))
    unet.save_pretrained(path / "unet")
    return path, unet


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 100])


@pytest.fixture
def stage_run(tmp_path):
    """(teacher folder, a run folder whose stage/ is that teacher's copy, written by unet2d)."""
    from dmdscale.distributed.checkpoint.stages import save_stage

    teacher, unet = _teacher(tmp_path / "teacher")
    weights = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    save_stage(tmp_path / "run1", {"generator": weights, "critic": {"head.w": torch.zeros(2)},
                                   "ema": {f"ema_0.9/{k}": v for k, v in weights.items()}}, family="unet2d")
    return teacher, tmp_path / "run1"


@pytest.mark.parametrize("part", ["generator", "critic", "ema"])
def test_a_truncated_stage_file_is_named_on_the_driver(stage_run, part):
    from dmdscale.distributed.checkpoint.stages import check_init, load_stage

    teacher, run = stage_run
    assert check_init(run, 0.9, "unet2d") == ("stage", run / "stage")
    _truncate(run / "stage" / f"{part}.safetensors")
    for ema in (None, 0.9):
        with pytest.raises(ConfigError, match=re.escape(f"train.init: {run / 'stage' / f'{part}.safetensors'} is "
                                                        "damaged or cut short")):
            check_init(run, ema, "unet2d")
    with pytest.raises(ConfigError, match="cut short"):  # the workers' loader checks the same way first
        load_stage(run)


def test_a_start_of_another_family_is_refused_naming_the_file(stage_run, tmp_path):
    from dmdscale.distributed.checkpoint.stages import check_init
    from dmdscale.export import STUDENT_INFO

    teacher, run = stage_run
    with pytest.raises(ConfigError, match=r"train.init: .* holds a unet2d stage \(generator.safetensors says so\), "
                                          r"but this run distils a sd15 teacher \(model.family\)"):
        check_init(run, None, "sd15")
    student = tmp_path / "other" / "student"
    (student / "unet").mkdir(parents=True)
    shutil.copy(run / "stage" / "generator.safetensors", student / "unet" / "diffusion_pytorch_model.safetensors")
    (student / STUDENT_INFO).write_text(json.dumps({"timesteps": [999], "family": "sd15"}))
    with pytest.raises(ConfigError, match=r"train.init: .* holds a sd15 student \(dmdscale.json says so\), but this "
                                          r"run distils a unet2d teacher"):
        check_init(tmp_path / "other", None, "unet2d")
    (student / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ConfigError, match="train.init: .* has no unet/diffusion_pytorch_model.safetensors"):
        check_init(tmp_path / "other", None, "sd15")


def test_a_stage_or_student_of_another_teacher_does_not_fit_the_generator(stage_run, tmp_path):
    """The generator is a copy of the teacher: its weights' names and shapes are the teacher's
    (read from the headers only), so another teacher's stage fails here, not on the workers."""
    from safetensors.torch import load_file, save_file

    from dmdscale.distributed.checkpoint.stages import check_init_fits
    from dmdscale.export import STUDENT_INFO

    teacher, run = stage_run
    assert check_init_fits(run, teacher) is True
    assert check_init_fits(None, teacher) is True
    assert check_init_fits(run, "org/hub-teacher") is False and check_init_fits(run, "") is False  # not readable here
    wider, _ = _teacher(tmp_path / "wider", width=16)
    generator = run / "stage" / "generator.safetensors"
    with pytest.raises(ConfigError, match=re.escape(f"train.init: {generator} does not fit this run's generator, a "
                                                    f"copy of the teacher {wider} (") + r".*of other shapes \(e.g. unet\..*"
                                                    r"against the teacher's"):
        check_init_fits(run, wider)
    weights = load_file(generator)
    dropped = next(iter(weights))
    save_file({k: v for k, v in weights.items() if k != dropped}, generator)
    with pytest.raises(ConfigError, match=re.escape(f"1 of the teacher's unet weights missing (e.g. {dropped})")):
        check_init_fits(run, teacher)
    # An exported student's UNet is the generator's unet.* weights; a LoRA stage's adapter is new.
    student = tmp_path / "s" / "student"
    _teacher(student)
    (student / STUDENT_INFO).write_text(json.dumps({"family": "unet2d"}))
    assert check_init_fits(tmp_path / "s", teacher) is True
    lora = {k.replace(".weight", ".base_layer.weight") if k == "unet.conv_in.weight" else k: v for k, v in weights.items()}
    save_file(lora | {"unet.conv_in.lora_A.default.weight": torch.zeros(2, 2)}, generator)
    assert check_init_fits(run, teacher) is True
