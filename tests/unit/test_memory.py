"""memory: parameter counts of the real UNets and transformers (meta device) and the per-GPU planner's
relations, teacher sharding and the fewest-GPU answer included; the profiles live in the family
folders, the command lists the registry's, and a new family's profile plans without the planner
knowing it."""
import ast
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import dmdscale.memory as command
from dmdscale.families import FAMILIES
from dmdscale.families.flow.memory import PROFILES as FLOW
from dmdscale.families.sd.memory import PROFILES as SD
from dmdscale.tools.memory import (
    GIB,
    PREFETCH_BUCKET_PARAMS,
    MemoryProfile,
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
PROFILES = SD | FLOW
# A made-up family's profile: a two-level UNet, nothing of it in dmdscale/tools/memory.py.
TINY = MemoryProfile(
    name="tiny", model_class="UNet2DConditionModel",
    config={"sample_size": 16, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64],
            "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 8, "cross_attention_dim": 32,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]},
    head="conv", activation_gib_per_image={False: 0.5, True: 0.1}, discriminator_share=0.5,
    lora_targets=("to_q", "to_k", "to_v", "to_out.0", "not_a_module"))


def registry_profiles() -> dict[str, MemoryProfile]:
    return {f.memory_profile.name: f.memory_profile for f in FAMILIES.values()
            if getattr(f, "memory_profile", None) is not None}


@pytest.mark.parametrize("family, low, high", [("sd15", 859e6, 861e6), ("sdxl", 2.56e9, 2.57e9)])
def test_published_unet_sizes(family, low, high):
    assert low <= count_parameters(unet_config(SD[family])) <= high


@pytest.mark.parametrize("family, published", [("sd3", 8.1e9), ("flux", 11.9e9)])
def test_published_transformer_sizes(family, published):
    # SD3.5-Large "8.1B", FLUX.1-dev "12B" (11.9B): the published configs on diffusers' classes.
    assert model_sizes(FLOW[family]).params == pytest.approx(published, rel=0.02)


def test_unet_config_is_a_copy():
    unet_config(SD["sdxl"])["sample_size"] = 8  # a benchmark shrinking its copy
    assert unet_config(SD["sdxl"])["sample_size"] == 128
    with pytest.raises(ValueError, match="no UNet"):
        unet_config(FLOW["flux"])


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_lora_trains_a_small_fraction(family):
    # Rank 64 on the authors' targets, convolutions included, trains ~7.7% of the UNet
    # (SDXL: 197M of 2.57B), more than attention-only LoRA would: bound at 10%. The
    # transformers' attention/ff linears: ~2.5%.
    trainable = lora_sizes(PROFILES[family]).params
    assert 0 < trainable < 0.10 * model_sizes(PROFILES[family]).params


def test_transformer_lora_targets_are_those_the_model_has():
    # FLUX's single blocks have proj_mlp, SD3's joint blocks do not; both have the rest.
    assert "proj_mlp" in lora_targets(FLOW["flux"]) and "proj_mlp" not in lora_targets(FLOW["sd3"])
    assert set(lora_targets(FLOW["flux"])) - {"proj_mlp"} == set(lora_targets(FLOW["sd3"]))


def test_zero3_states_shrink_with_gpus():
    generator = [plan(SD["sdxl"], n, 3, False, False).generator_gib for n in (1, 2, 4, 8)]
    assert generator == sorted(generator, reverse=True) and generator[-1] < generator[0] / 4


@pytest.mark.parametrize("stage, gpus", [(2, 1), (2, 8), (3, 1), (3, 8)])
def test_offload_moves_optimizer_to_cpu(stage, gpus):
    on_gpu = plan(SD["sdxl"], gpus, stage, False, False)
    offloaded = plan(SD["sdxl"], gpus, stage, True, False)
    assert offloaded.total_gib < on_gpu.total_gib
    assert offloaded.cpu_gib > on_gpu.cpu_gib


def test_checkpointing_cuts_activations():
    assert plan(SD["sdxl"], 1, 2, True, False, gradient_checkpointing=False).activations_gib > \
        plan(SD["sdxl"], 1, 2, True, False, gradient_checkpointing=True).activations_gib


def test_sdxl_on_80_gib_gpus():
    # Full fine-tuning keeps two 2.57B-parameter fp32 engines at 20 bytes/param on one GPU
    # (~48 GiB each): far over 80 GiB, as the DMD2 authors found; ZeRO-2 over two GPUs halves
    # the partitioned states (4 + 16 / 2 bytes/param) and fits.
    assert not plan(SD["sdxl"], 1, 2, False, False).fits
    assert plan(SD["sdxl"], 2, 2, False, False).fits
    # One GPU fits once the optimizer states go to host memory (ZeRO-3 + offload: ~10 GiB per
    # engine on the GPU, >100 GiB of host RAM), or with LoRA (the generator's states shrink to
    # its adapters beside its ~10 GiB fp32 base; the fully trained critic's ~48 GiB still
    # leaves room under 80).
    assert plan(SD["sdxl"], 1, 3, True, False).fits
    assert plan(SD["sdxl"], 1, 2, False, True).fits


@pytest.mark.parametrize("gpus", [1, 4])
def test_precision_of_each_part(gpus):
    """bf16 teacher; fp32 engines (ZeRO-2: fp32 params replicated, fp32 clone + grads + Adam
    partitioned); the LoRA generator's frozen base is the fp32 copy of the teacher."""
    from dmdscale.tools.memory import critic_sizes

    params = model_sizes(SD["sdxl"]).params
    full = plan(SD["sdxl"], gpus, 2, False, False)
    assert full.teacher_gib == pytest.approx(2 * params / GIB)
    assert full.critic_gib == pytest.approx((4 + 16 / gpus) * critic_sizes(SD["sdxl"]).params / GIB, rel=1e-6)
    lora = plan(SD["sdxl"], gpus, 2, False, True)
    adapters = lora_sizes(SD["sdxl"]).params
    assert lora.generator_gib == pytest.approx((4 * params + (4 + 16 / gpus) * adapters) / GIB, rel=1e-6)


def test_cli_json_rows_match_the_planner():
    # sd15: its LoRA UNet builds faster than SDXL's in the subprocess.
    out = subprocess.run([sys.executable, "-m", "dmdscale.memory", "--family", "sd15", "--gpus", "1", "2",
                          "--json"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    expected = plan_table(SD["sd15"], (1, 2))
    assert len(rows) == len(expected) == 16
    assert [(r["num_gpus"], r["zero_stage"], r["offload_optimizer"], r["lora"], r["fits"]) for r in rows] == \
        [(p.num_gpus, p.zero_stage, p.offload_optimizer, p.lora, p.fits) for p in expected]


def test_cli_table_states_its_precision_assumptions(capsys):
    command.main(["--family", "sd15", "--gpus", "1"])  # in-process: the LoRA sizes are cached by now
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "bf16 frozen teacher" in text and "fp32 generator and critic weights, grads and AdamW states" in text


def test_cli_unknown_family_names_the_allowed_ones():
    out = subprocess.run([sys.executable, "-m", "dmdscale.memory", "--family", "sd2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert all(f in out.stderr for f in ("sd15", "sdxl", "sd3", "flux"))


@pytest.mark.parametrize("family, gpus", [("sd3", 4), ("flux", 8)])
def test_sharding_divides_the_teacher_by_the_gpu_count(family, gpus):
    replicated = plan(FLOW[family], gpus, 3, False, False)
    sharded = plan(FLOW[family], gpus, 3, False, False, shard_teacher=True)
    # 2 bytes/param / GPUs + the gathered layer and DeepSpeed's prefetch of the next ones in bf16.
    gathered = 2 * (model_sizes(FLOW[family]).largest_layer + PREFETCH_BUCKET_PARAMS) / GIB
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
        plan(FLOW["sd3"], 4, stage, False, False, shard_teacher=True)


def test_zero3_partitions_the_lora_base():
    # The generator engine partitions its frozen fp32 base too: from 1 to 8 GPUs its share
    # drops by 4 bytes/param x 7/8 (ZeRO-2 keeps it whole on every GPU).
    params = model_sizes(SD["sdxl"]).params
    drop = plan(SD["sdxl"], 1, 3, False, True).generator_gib - plan(SD["sdxl"], 8, 3, False, True).generator_gib
    assert drop >= 4 * params * 7 / 8 / GIB
    assert plan(SD["sdxl"], 8, 3, False, True).generator_gib < plan(SD["sdxl"], 8, 2, False, True).generator_gib


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_min_gpus_is_the_fewest_that_fit_and_sharding_never_needs_more(family):
    counts = {}
    for offload in (False, True):
        for lora in (False, True):
            for shard in (False, True):
                best = min_gpus(FLOW[family], 3, offload, lora, shard_teacher=shard)
                assert best is not None and best.fits and best.shard_teacher == shard
                if best.num_gpus > 1:  # one GPU fewer does not fit
                    assert not plan(FLOW[family], best.num_gpus - 1, 3, offload, lora, shard_teacher=shard).fits
                counts[offload, lora, shard] = best.num_gpus
    for offload in (False, True):
        for lora in (False, True):
            assert counts[offload, lora, True] <= counts[offload, lora, False]
    # Without offload the replicated bf16 teacher (15-22 GiB) costs whole GPUs: sharding saves some.
    assert counts[False, False, True] < counts[False, False, False]


def test_cli_min_gpus_json_rows_match_the_planner(capsys):
    command.main(["--family", "sd3", "--min-gpus", "--max-gpus", "32", "--json"])
    rows = json.loads(capsys.readouterr().out)
    expected = min_gpus_table(FLOW["sd3"], max_gpus=32)
    assert len(rows) == len(expected) == 12  # ZeRO-2, ZeRO-3, ZeRO-3 + sharded teacher x offload x LoRA
    assert [(r["num_gpus"], r["zero_stage"], r["shard_teacher"], r["fits"]) for r in rows] == \
        [(p.num_gpus, p.zero_stage, p.shard_teacher, p.fits) for p in expected]
    assert any(r["shard_teacher"] for r in rows) and all(r["zero_stage"] == 3 for r in rows if r["shard_teacher"])


def test_cli_shard_teacher_plans_zero3_only(capsys):
    command.main(["--family", "sd3", "--gpus", "4", "--shard-teacher", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4 and all(r["zero_stage"] == 3 and r["shard_teacher"] for r in rows)


def test_command_lists_exactly_the_registry_profiles(capsys):
    registry = registry_profiles()
    # The families carry their profiles, each under its own family's name.
    assert registry and all(FAMILIES[name].memory_profile is profile for name, profile in registry.items())
    expected = registry
    found = command.profiles()
    assert list(found) == list(expected) and all(found[name] is expected[name] for name in expected)
    with pytest.raises(SystemExit):
        command.main(["--family", "nope"])
    choices = re.search(r"choose from (.*)\)", capsys.readouterr().err).group(1)
    assert [c.strip(" '") for c in choices.split(",")] == list(expected)


def test_a_new_familys_profile_plans_without_the_planner_knowing_it(monkeypatch, capsys):
    # The planner names no family: a new one adds its MemoryProfile in its own folder.
    tree = ast.parse((ROOT / "dmdscale" / "tools" / "memory.py").read_text())
    strings = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not strings & (set(FAMILIES) | set(PROFILES))
    sizes = model_sizes(TINY)
    assert sizes.params == count_parameters(TINY.config)
    assert lora_targets(TINY) == ("to_q", "to_k", "to_v", "to_out.0")  # the model has no "not_a_module"
    assert 0 < lora_sizes(TINY).params < sizes.params
    one = plan(TINY, 1, 2, False, True)
    # Critic turn, the peak: 1 + 2 x 0.5 forwards of 0.1 GiB.
    assert one.family == "tiny" and one.fits and one.activations_gib == pytest.approx(2 * 0.1)
    assert min_gpus(TINY, 3, False, False).num_gpus == 1
    # The command plans it as soon as a registered family carries it.
    monkeypatch.setitem(FAMILIES, "tiny", SimpleNamespace(name="tiny", memory_profile=TINY))
    assert command.profiles()["tiny"] is TINY and command.profiles() == registry_profiles()
    command.main(["--family", "tiny", "--gpus", "1", "2", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert [r["family"] for r in rows] == ["tiny"] * 16
    assert [r["total_gib"] for r in rows] == [round(p.total_gib, 2) for p in plan_table(TINY, (1, 2))]


def test_profiles_cache_by_content():
    twin = dataclasses.replace(TINY)  # another object, equal content: the planner's cached entries
    assert twin == TINY and hash(twin) == hash(TINY) and model_sizes(twin) is model_sizes(TINY)
    wider = dataclasses.replace(TINY, config=TINY.config | {"block_out_channels": [32, 96]})
    assert hash(wider) != hash(TINY) and model_sizes(wider).params > model_sizes(TINY).params
    heavier = dataclasses.replace(TINY, activation_gib_per_image={False: 1.0, True: 0.2})
    assert plan(heavier, 1, 2, False, False).activations_gib == 2 * plan(TINY, 1, 2, False, False).activations_gib
    with pytest.raises(ValueError, match="head"):
        dataclasses.replace(TINY, head="pixel")
