"""The DMD2 authors' text-to-image recipe stages on tiny SD1.5/SDXL teachers: SD1.5 stage 1
(no GAN, prompts only) -> stage 2 (GAN, from stage 1 through train.init); SDXL teacher ODE pairs
on a Ray actor pool (resumable) -> the regression stage -> the 1-step DMD2 stage from it."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from dmdscale.config import ConfigError, load_config
from dmdscale.data.sources import DataError
from dmdscale.driver import run
from dmdscale.families import resolve

pytestmark = pytest.mark.slow
CONFIGS = "pipelines/configs"


def quick(config: str, teacher: str, tmp_path, *overrides: str):
    return load_config(f"{CONFIGS}/{config}.yaml", [f"model.teacher={teacher}", f"cache_dir={tmp_path / 'cache'}",
                                                     "scale.shuffle_buffer=16", *overrides], quick=True)


@pytest.fixture(scope="module")
def prompts_txt(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("".join(f"a handwritten digit {i % 10}\n" for i in range(16)) + "\n")  # a blank line is skipped
    return str(path)


def start_weights(cfg, teacher: str):
    """What a train worker's generator and critic start from (worker.build_players)."""
    from dmdscale.distributed.worker import build_players

    _, generator, critic = build_players(cfg, resolve(cfg), teacher, torch.device("cpu"))
    return generator.state_dict(), critic.state_dict()


def tensors(shard) -> dict[str, np.ndarray]:
    """A pair shard's columns as Ray Data reads them for training."""
    import ray.data

    return ray.data.read_parquet(str(shard)).take_batch(1000, batch_format="numpy")


def assert_same(state: dict, saved: dict) -> None:
    assert set(saved) <= set(state)
    for k, v in saved.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)


def test_sd15_stage1_then_stage2(ray_local, tiny, prompts_txt, captioned_parquet, tmp_path, mlflow_uri):
    """Stage 1 (sd15_stage1.yaml: DM loss only, lr 1e-5) trains on prompts alone and says the
    real-image metrics were skipped; stage 2 (sd15_stage2.yaml: GAN on) starts from stage 1's
    final generator and critic, and refuses prompt-only data before any cluster work."""
    cfg1 = quick("sd15_stage1", tiny["sd15"], tmp_path, f"data.path={prompts_txt}", "train.max_steps=2")
    assert cfg1.loss.gan_generator_weight == cfg1.loss.gan_critic_weight == 0
    assert load_config(f"{CONFIGS}/sd15_stage1.yaml").train.lr == 1e-5
    stage2 = load_config(f"{CONFIGS}/sd15_stage2.yaml")
    assert stage2.train.lr == 5e-7 and stage2.loss.gan_generator_weight > 0 and stage2.train.init is not None
    out1 = tmp_path / "stage1"
    metrics = run(cfg1, out1)
    assert metrics["steps_completed"] == 2 and metrics["usable_rows"] == 16 and metrics["nonfinite_steps"] == 0
    assert "prompts only" in metrics["real_metrics_skipped"] == metrics["fid_skipped"]
    assert not any(k.startswith(("fid_student", "kid_", "swd_")) for k in metrics)
    saved = {part: load_file(out1 / "stage" / f"{part}.safetensors") for part in ("generator", "critic")}

    cfg2 = quick("sd15_stage2", tiny["sd15"], tmp_path, f"data.path={captioned_parquet}", f"train.init={out1}")
    generator, critic = start_weights(cfg2, tiny["sd15"])
    assert_same(generator, saved["generator"])
    assert_same(critic, saved["critic"])
    teacher_generator, _ = start_weights(quick("sd15_stage2", tiny["sd15"], tmp_path, "train.init=null"), tiny["sd15"])
    assert any(not torch.equal(teacher_generator[k], v) for k, v in saved["generator"].items())  # stage 1 trained

    with pytest.raises(ConfigError, match=r"data.path.*prompts only.*loss.gan_generator_weight"):
        run(quick("sd15_stage2", tiny["sd15"], tmp_path, f"data.path={prompts_txt}", f"train.init={out1}"),
            tmp_path / "refused")
    assert not (tmp_path / "refused" / "ray").exists()  # refused before any cluster work


@pytest.fixture(scope="module")
def sdxl_pairs(ray_local, tiny, prompts_txt, tmp_path_factory):
    """8 teacher ODE pairs (2 shards of 4) made once for this module."""
    from dmdscale.distributed.ode_pairs import make_pairs

    folder = tmp_path_factory.mktemp("pairs") / "ode_pairs"
    cfg = quick("sdxl_regression", tiny["sdxl"], folder.parent, f"data.path={prompts_txt}",
                f"regression.pairs_path={folder}")
    return cfg, folder, make_pairs(cfg, resolve(cfg), prompts_txt, folder)


def test_ode_pairs_are_resumable(sdxl_pairs, prompts_txt):
    """A rerun writes only the missing shard, identically, and leaves the others untouched; a
    folder made with other settings is refused by name."""
    from dmdscale.data.latents import vae_latent_shape
    from dmdscale.distributed.ode_pairs import check_pairs_target, make_pairs, pairs_key

    cfg, folder, first = sdxl_pairs
    assert first == {"pair_shards_written": 2, "pair_shards_reused": 0}
    shards = sorted(folder.glob("pairs-*.parquet"))
    assert [p.name for p in shards] == ["pairs-00000.parquet", "pairs-00001.parquet"]
    table = pq.read_table(shards[1])
    assert table.num_rows == 4 and table.column("index").to_pylist() == [4, 5, 6, 7]
    assert {"noise", "target", "prompt_embeds", "pooled_prompt_embeds", "prompt"} <= set(table.column_names)
    kept = shards[0].stat()
    before = tensors(shards[1])
    shards[1].unlink()
    assert make_pairs(cfg, resolve(cfg), prompts_txt, folder) == {"pair_shards_written": 1, "pair_shards_reused": 1}
    after_stat = shards[0].stat()
    assert (after_stat.st_mtime_ns, after_stat.st_ino) == (kept.st_mtime_ns, kept.st_ino)
    after = tensors(shards[1])
    for column in ("noise", "target", "prompt_embeds", "pooled_prompt_embeds"):
        np.testing.assert_array_equal(after[column], before[column])
    noise, target = after["noise"], after["target"]
    assert noise.shape == target.shape == (4, *vae_latent_shape(cfg.model.teacher, 32)) and not np.allclose(noise, target)
    other = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"guidance_scale": 3.0})})
    with pytest.raises(DataError, match="guidance_scale"):
        check_pairs_target(folder, pairs_key(other, prompts_txt))


def test_sdxl_regression_then_one_step_dmd2(sdxl_pairs, tiny, prompts_txt, captioned_parquet, tmp_path, mlflow_uri):
    """The regression stage trains on the pairs (reused, not remade) on Ray Train + DeepSpeed and
    writes a stage/ that train.init takes; the 1-step DMD2 stage at t=399 (GAN on) starts from its
    generator and runs end to end."""
    _, folder, _ = sdxl_pairs
    out = tmp_path / "regression"
    cfg = quick("sdxl_regression", tiny["sdxl"], folder.parent, f"data.path={prompts_txt}",
                f"regression.pairs_path={folder}")
    metrics = run(cfg, out)
    assert metrics["pair_shards_written"] == 0 and metrics["pair_shards_reused"] == 2
    assert metrics["steps_completed"] == 4 and metrics["nonfinite_steps"] == 0
    assert metrics["final_loss_regression"] < metrics["first_loss_regression"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert [r["step"] for r in json.loads((out / "train_log.json").read_text())] == [0, 1, 2, 3]
    saved = load_file(out / "stage" / "generator.safetensors")
    assert not (out / "stage" / "critic.safetensors").exists()

    dmd = quick("sdxl_1step", tiny["sdxl"], tmp_path, f"data.path={captioned_parquet}", f"train.init={out}",
                "train.max_steps=2")
    assert dmd.generator.timesteps == [399] and dmd.loss.gan_generator_weight > 0
    generator, _ = start_weights(dmd, tiny["sdxl"])
    assert_same(generator, saved)
    result = run(dmd, tmp_path / "dmd2")
    assert result["steps_completed"] == 2 and result["nonfinite_steps"] == 0
    info = json.loads((tmp_path / "dmd2" / "student" / "dmdscale.json").read_text())
    assert info["timesteps"] == [399]
