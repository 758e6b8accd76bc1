"""memory: parameter counts of the real UNets and transformers (meta device) and the per-GPU planner's
relations, teacher sharding and the fewest-GPU answer included."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dmdscale.tools.memory import (
    GIB,
    PREFETCH_BUCKET_PARAMS,
    count_parameters,
    lora_sizes,
    lora_targets,
    min_gpus,
    min_gpus_table,
    model_sizes,
    plan,
    plan_table,
    unet_config,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family, low, high", [("sd15", 859e6, 861e6), ("sdxl", 2.56e9, 2.57e9)])
def test_published_unet_sizes(family, low, high):
    assert low <= count_parameters(unet_config(family)) <= high


@pytest.mark.parametrize("family, published", [("sd3", 8.1e9), ("flux", 11.9e9)])
def test_published_transformer_sizes(family, published):
    # SD3.5-Large "8.1B", FLUX.1-dev "12B" (11.9B): the published configs on diffusers' classes.
    assert model_sizes(family).params == pytest.approx(published, rel=0.02)


def test_unet_config_is_a_copy():
    unet_config("sdxl")["sample_size"] = 8  # a benchmark shrinking its copy
    assert unet_config("sdxl")["sample_size"] == 128


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_lora_trains_a_small_fraction(family):
    # Rank 64 on the authors' targets, convolutions included, trains ~7.7% of the UNet
    # (SDXL: 197M of 2.57B), more than attention-only LoRA would: bound at 10%. The
    # transformers' attention/ff linears: ~2.5%.
    trainable = lora_sizes(family).params
    assert 0 < trainable < 0.10 * model_sizes(family).params


def test_transformer_lora_targets_are_those_the_model_has():
    # FLUX's single blocks have proj_mlp, SD3's joint blocks do not; both have the rest.
    assert "proj_mlp" in lora_targets("flux") and "proj_mlp" not in lora_targets("sd3")
    assert set(lora_targets("flux")) - {"proj_mlp"} == set(lora_targets("sd3"))


def test_zero3_states_shrink_with_gpus():
    generator = [plan("sdxl", n, 3, False, False).generator_gib for n in (1, 2, 4, 8)]
    assert generator == sorted(generator, reverse=True) and generator[-1] < generator[0] / 4


@pytest.mark.parametrize("stage, gpus", [(2, 1), (2, 8), (3, 1), (3, 8)])
def test_offload_moves_optimizer_to_cpu(stage, gpus):
    on_gpu = plan("sdxl", gpus, stage, False, False)
    offloaded = plan("sdxl", gpus, stage, True, False)
    assert offloaded.total_gib < on_gpu.total_gib
    assert offloaded.cpu_gib > on_gpu.cpu_gib


def test_checkpointing_cuts_activations():
    assert plan("sdxl", 1, 2, True, False, gradient_checkpointing=False).activations_gib > \
        plan("sdxl", 1, 2, True, False, gradient_checkpointing=True).activations_gib


def test_sdxl_on_80_gib_gpus():
    # Full fine-tuning keeps two 2.57B-parameter fp32 engines at 20 bytes/param on one GPU
    # (~48 GiB each): far over 80 GiB, as the DMD2 authors found; ZeRO-2 over two GPUs halves
    # the partitioned states (4 + 16 / 2 bytes/param) and fits.
    assert not plan("sdxl", 1, 2, False, False).fits
    assert plan("sdxl", 2, 2, False, False).fits
    # One GPU fits once the optimizer states go to host memory (ZeRO-3 + offload: ~10 GiB per
    # engine on the GPU, >100 GiB of host RAM), or with LoRA (the generator's states shrink to
    # its adapters beside its ~10 GiB fp32 base; the fully trained critic's ~48 GiB still
    # leaves room under 80).
    assert plan("sdxl", 1, 3, True, False).fits
    assert plan("sdxl", 1, 2, False, True).fits


@pytest.mark.parametrize("gpus", [1, 4])
def test_precision_of_each_part(gpus):
    """bf16 teacher; fp32 engines (ZeRO-2: fp32 params replicated, fp32 clone + grads + Adam
    partitioned); the LoRA generator's frozen base is the fp32 copy of the teacher."""
    from dmdscale.tools.memory import critic_sizes

    params = model_sizes("sdxl").params
    full = plan("sdxl", gpus, 2, False, False)
    assert full.teacher_gib == pytest.approx(2 * params / GIB)
    assert full.critic_gib == pytest.approx((4 + 16 / gpus) * critic_sizes("sdxl").params / GIB, rel=1e-6)
    lora = plan("sdxl", gpus, 2, False, True)
    adapters = lora_sizes("sdxl").params
    assert lora.generator_gib == pytest.approx((4 * params + (4 + 16 / gpus) * adapters) / GIB, rel=1e-6)


def test_cli_json_rows_match_the_planner():
    # sd15: its LoRA UNet builds faster than SDXL's in the subprocess.
    out = subprocess.run([sys.executable, "-m", "dmdscale.tools.memory", "--family", "sd15", "--gpus", "1", "2",
                          "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    expected = plan_table("sd15", (1, 2))
    assert len(rows) == len(expected) == 16
    assert [(r["num_gpus"], r["zero_stage"], r["offload_optimizer"], r["lora"], r["fits"]) for r in rows] == \
        [(p.num_gpus, p.zero_stage, p.offload_optimizer, p.lora, p.fits) for p in expected]


def test_cli_table_states_its_precision_assumptions(capsys):
    from dmdscale.tools.memory import main

    main(["--family", "sd15", "--gpus", "1"])  # in-process: the LoRA sizes are cached by now
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "bf16 frozen teacher" in text and "fp32 generator and critic weights, grads and AdamW states" in text


def test_cli_unknown_family_names_the_allowed_ones():
    out = subprocess.run([sys.executable, "-m", "dmdscale.tools.memory", "--family", "sd2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert all(f in out.stderr for f in ("sd15", "sdxl", "sd3", "flux"))


@pytest.mark.parametrize("family, gpus", [("sd3", 4), ("flux", 8)])
def test_sharding_divides_the_teacher_by_the_gpu_count(family, gpus):
    replicated = plan(family, gpus, 3, False, False)
    sharded = plan(family, gpus, 3, False, False, shard_teacher=True)
    # 2 bytes/param / GPUs + the gathered layer and DeepSpeed's prefetch of the next ones in bf16.
    gathered = 2 * (model_sizes(family).largest_layer + PREFETCH_BUCKET_PARAMS) / GIB
    assert sharded.teacher_gib == pytest.approx(replicated.teacher_gib / gpus + gathered)
    assert replicated.teacher_gib / gpus < sharded.teacher_gib < replicated.teacher_gib / gpus + 0.5
    # Only the teacher moves.
    assert (sharded.generator_gib, sharded.critic_gib, sharded.activations_gib) == \
        (replicated.generator_gib, replicated.critic_gib, replicated.activations_gib)


def test_prefetch_bucket_is_deepspeeds_default():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    assert int(DeepSpeedZeroConfig.model_fields["prefetch_bucket_size"].default) == PREFETCH_BUCKET_PARAMS


@pytest.mark.parametrize("stage", [1, 2])
def test_shard_teacher_needs_zero3(stage):
    with pytest.raises(ValueError, match="ZeRO-3"):
        plan("sd3", 4, stage, False, False, shard_teacher=True)


def test_zero3_partitions_the_lora_base():
    # The generator engine partitions its frozen fp32 base too: from 1 to 8 GPUs its share
    # drops by 4 bytes/param x 7/8 (ZeRO-2 keeps it whole on every GPU).
    params = model_sizes("sdxl").params
    drop = plan("sdxl", 1, 3, False, True).generator_gib - plan("sdxl", 8, 3, False, True).generator_gib
    assert drop >= 4 * params * 7 / 8 / GIB
    assert plan("sdxl", 8, 3, False, True).generator_gib < plan("sdxl", 8, 2, False, True).generator_gib


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_min_gpus_is_the_fewest_that_fit_and_sharding_never_needs_more(family):
    counts = {}
    for offload in (False, True):
        for lora in (False, True):
            for shard in (False, True):
                best = min_gpus(family, 3, offload, lora, shard_teacher=shard)
                assert best is not None and best.fits and best.shard_teacher == shard
                if best.num_gpus > 1:  # one GPU fewer does not fit
                    assert not plan(family, best.num_gpus - 1, 3, offload, lora, shard_teacher=shard).fits
                counts[offload, lora, shard] = best.num_gpus
    for offload in (False, True):
        for lora in (False, True):
            assert counts[offload, lora, True] <= counts[offload, lora, False]
    # Without offload the replicated bf16 teacher (15-22 GiB) costs whole GPUs: sharding saves some.
    assert counts[False, False, True] < counts[False, False, False]


def test_cli_min_gpus_json_rows_match_the_planner(capsys):
    from dmdscale.tools.memory import main

    main(["--family", "sd3", "--min-gpus", "--max-gpus", "32", "--json"])
    rows = json.loads(capsys.readouterr().out)
    expected = min_gpus_table("sd3", max_gpus=32)
    assert len(rows) == len(expected) == 12  # ZeRO-2, ZeRO-3, ZeRO-3 + sharded teacher x offload x LoRA
    assert [(r["num_gpus"], r["zero_stage"], r["shard_teacher"], r["fits"]) for r in rows] == \
        [(p.num_gpus, p.zero_stage, p.shard_teacher, p.fits) for p in expected]
    assert any(r["shard_teacher"] for r in rows) and all(r["zero_stage"] == 3 for r in rows if r["shard_teacher"])


def test_cli_shard_teacher_plans_zero3_only(capsys):
    from dmdscale.tools.memory import main

    main(["--family", "sd3", "--gpus", "4", "--shard-teacher", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and all(r["zero_stage"] == 3 and r["shard_teacher"] for r in rows)
