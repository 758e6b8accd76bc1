"""Checkpoints: DeepSpeed engine state round trips (ZeRO-2, ZeRO-3 + CPU offload) through
weights-only loading, refusal of pickled code, data positions, and the run journal."""
import os
import pickle
import zipfile

import pyarrow.fs
import pytest
import torch

from dmdscale.config import build_config
from dmdscale.core.sampling import NoiseStream
from dmdscale.core.schedule import NoiseSchedule
from dmdscale.distributed.checkpoint import (
    DataPosition,
    RunJournal,
    TrainingState,
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


def test_run_journal_resumes_same_config_refuses_another_and_restarts_after_finish(tmp_path):
    journal = RunJournal.at(str(tmp_path), "run")
    cfg = build_config({}).flat()
    assert journal.begin(cfg) == "new"
    assert journal.record_start(0) == 0 and journal.record_start(10) == 1
    assert journal.mark_once("failed_at_step_12") and not journal.mark_once("failed_at_step_12")
    longer = cfg | {"train.max_steps": 5000}  # resuming with more steps is allowed
    assert journal.begin(longer) == "resume"
    with pytest.raises(ValueError, match="train.lr"):
        journal.begin(cfg | {"train.lr": 1.0})
    (tmp_path / "run" / "checkpoint_x").mkdir()
    journal.mark_finished()
    assert journal.begin(cfg) == "new"  # a finished run's folder is cleared for the new one
    assert not (tmp_path / "run" / "checkpoint_x").exists()
    assert journal.read()["starts"] == []
    assert isinstance(journal.fs, pyarrow.fs.FileSystem)
