"""scale.shard_teacher: the frozen teacher partitioned over 2 Ray Train workers by an optimizer-less
ZeRO-3 engine (`engine.shard_frozen`), built as the train worker builds its players
(`worker.build_engines`), on the tiny SD1.5 teacher under bf16.

Claims: each rank stores only its half of every teacher parameter (and nothing whole outside a
forward); the DMD2 losses and the teacher's outputs (its CFG forward and `features`, a family
method that calls the UNet's submodules directly) are those of the unsharded ZeRO-3 run; and
wrapping each player in its engine as soon as it is made (the lean start-up) leaves the start
weights those of the plain `build_players`.

Tolerance: exact (rtol=atol=0). The all-gathered partitions are the teacher's bf16 values in
their places, so its forwards run the same ops on the same bits; everything else in the two runs
(seeds, data, generator and critic engines) is the same.
"""
import json
import math
import sys

import pytest
import torch
from conftest import text_cfg
from dmdscale.families import resolve

STEPS = 4
BATCH = 4
GUIDANCE = 3.0  # a CFG teacher: the batched conditional + unconditional forward


def _train(config):
    """Train function: build the players as the train worker does, run DMD2 steps on fixed
    latents and text embeddings, then probe the teacher. Every rank writes what it stores of
    the teacher to storage_<rank>.json; rank 0 writes losses and probes to result.json."""
    import ray.train

    from dmdscale.config import Config
    from dmdscale.core.step import Batch, DMD2Step
    from dmdscale.distributed.worker import all_ranks_agree, all_ranks_sum, build_engines, build_players

    torch.set_num_threads(1)
    cfg = Config.model_validate(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    micro, device, out = cfg.train.batch_size // world, torch.device("cpu"), config["out"]
    if rank == 0:  # the plain players' start weights, for the lean start-up's check
        torch.manual_seed(cfg.train.seed)
        plain = build_players(cfg.model_copy(update={"scale": cfg.scale.model_copy(update={"shard_teacher": False})}), resolve(cfg.model_copy(update={"scale": cfg.scale.model_copy(update={"shard_teacher": False})})),
                              cfg.model.teacher, device)
    torch.manual_seed(cfg.train.seed)
    teacher, gen, critic = build_engines(cfg, resolve(cfg), cfg.model.teacher, device, micro)
    start = {"generator": gen.full_state_dict(), "critic": critic.full_state_dict()}  # collective
    same_start = {part: all(torch.equal(v, plain[i + 1].state_dict()[k]) for k, v in start[part].items())
                  for i, part in enumerate(start)} if rank == 0 else {}

    step_fn = DMD2Step(cfg, teacher, gen, critic, sync_flag=all_ranks_agree, sync_sum=all_ranks_sum, rank=rank,
                       world_size=world, device=device)
    data = torch.Generator().manual_seed(1)
    history = []
    for step in range(STEPS):
        latents = torch.randn(cfg.train.batch_size, 4, 16, 16, generator=data)
        embeds = torch.randn(cfg.train.batch_size, 32, 32, generator=data)
        rows = slice(rank * micro, (rank + 1) * micro)
        metrics = step_fn(Batch(latents[rows], {"prompt_embeds": embeds[rows]}), step)
        losses = torch.tensor([metrics.get(k, 0.0) for k in ("loss_dm", "loss_gan_generator", "loss_fake_score",
                                                             "loss_gan_critic")], dtype=torch.float64)
        torch.distributed.all_reduce(losses)
        history.append((losses / world).tolist())

    probe = torch.Generator().manual_seed(2)
    x_t, t = torch.randn(2, 4, 16, 16, generator=probe), torch.tensor([100, 700])
    cond = {"prompt_embeds": torch.randn(2, 32, 32, generator=probe)}
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):  # as the step runs the teacher
        x0 = teacher(x_t, t, cond, GUIDANCE).float()
        features = teacher.features(x_t, t, cond).float()

    storage = [{"name": name, "numel": getattr(p, "ds_numel", p.numel()), "data": p.data.numel(),
                "stored": p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.data.numel(),
                "dtype": str((p.ds_tensor if hasattr(p, "ds_tensor") else p).dtype)}
               for name, p in teacher.named_parameters()]
    with open(f"{out}/storage_{rank}.json", "w") as f:
        json.dump(storage, f)
    if rank == 0:
        with open(f"{out}/result.json", "w") as f:
            json.dump({"history": history, "x0": x0.tolist(), "features": features.tolist(),
                       "same_start": same_start}, f)


def _run(tmp_path, tiny, shard: bool, workers: int = 2):
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    cfg = text_cfg("sd15", tiny["sd15"], **{
        "train.batch_size": BATCH, "train.ttur_ratio": 2, "train.lr": 1e-3, "train.mixed_precision": "bf16",
        "scale.num_workers": workers, "scale.zero_stage": 3, "scale.shard_teacher": shard,
        "loss.guidance_scale": GUIDANCE, "loss.gan_generator_weight": 0.1, "loss.gan_critic_weight": 0.1})
    out = tmp_path / f"shard_{shard}"
    out.mkdir()
    TorchTrainer(_train, train_loop_config={"cfg": cfg.model_dump(), "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
                 run_config=RunConfig(name=f"teacher_shard_{shard}", storage_path=str(tmp_path / "ray"))).fit()
    result = json.loads((out / "result.json").read_text())
    storage = [json.loads((out / f"storage_{r}.json").read_text()) for r in range(workers)]
    return result, storage


@pytest.mark.slow
def test_sharded_teacher_stores_half_per_rank_and_trains_as_unsharded(tmp_path, tiny, ray_local):
    sharded, storage = _run(tmp_path, tiny, shard=True)
    whole, whole_storage = _run(tmp_path, tiny, shard=False)

    # Each rank: every teacher parameter a half-partition (DeepSpeed pads to a multiple of the
    # world size), stored in bf16, none of it whole outside a forward.
    for rank_storage in storage:
        assert len(rank_storage) > 50
        for p in rank_storage:
            assert p["stored"] == math.ceil(p["numel"] / 2) and p["data"] == 0, p
            assert p["dtype"] == "torch.bfloat16", p
    total = sum(p["numel"] for p in storage[0])
    held = sum(p["stored"] for p in storage[0])
    print(f"teacher elements: {total}; stored per rank sharded: {held}, unsharded: "
          f"{sum(p['stored'] for p in whole_storage[0])}")
    assert held <= total / 2 + len(storage[0])
    # The storage check has teeth: without sharding every rank holds the whole teacher.
    assert all(p["stored"] == p["data"] == p["numel"] for r in whole_storage for p in r)

    history, reference = torch.tensor(sharded["history"]), torch.tensor(whole["history"])
    assert history.shape == (STEPS, 4) and torch.isfinite(history).all()
    assert (history[::2, 0] > 0).all()  # generator turns ran the teacher (loss_dm every ttur_ratio steps)
    torch.testing.assert_close(history, reference, rtol=0, atol=0)
    for probe in ("x0", "features"):
        torch.testing.assert_close(torch.tensor(sharded[probe]), torch.tensor(whole[probe]), rtol=0, atol=0)
    assert sharded["same_start"] == whole["same_start"] == {"generator": True, "critic": True}


@pytest.mark.slow
def test_a_run_with_a_sharded_teacher_trains_and_reports_the_teachers_share(ray_local, tiny, captioned_parquet,
                                                                             tmp_path, mlflow_uri):
    """The driver's whole path (TrainWorker, checkpoints, final report and evaluation) on 2 workers
    with scale.shard_teacher: every step trains, and rank 0 reports storing half the teacher."""
    from dmdscale.config import load_config
    from dmdscale.driver import run
    from dmdscale.families.sd.model import load_sd_teacher

    cfg = load_config("pipelines/configs/sd15_stage2.yaml", [
        f"model.teacher={tiny['sd15']}", f"cache_dir={tmp_path / 'cache'}", f"data.path={captioned_parquet}",
        "train.init=null", "train.max_steps=4", "train.checkpoint_every=2", "train.mixed_precision=bf16",
        "train.ema_decays=[]", "scale.shuffle_buffer=16", "scale.num_workers=2", "scale.zero_stage=3",
        "scale.shard_teacher=true"], quick=True)
    metrics = run(cfg, tmp_path / "run")
    assert metrics["steps_completed"] == 4 and metrics["nonfinite_steps"] == 0
    whole = [p.numel() for p in load_sd_teacher(tiny["sd15"], "sd15").parameters()]
    assert metrics["teacher_parameters_per_rank"] == sum(math.ceil(n / 2) for n in whole) < sum(whole)
