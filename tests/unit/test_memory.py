"""memory: parameter counts of the real UNets (meta device) and the per-GPU planner's relations."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dmdscale.tools.memory import count_parameters, lora_sizes, plan, plan_table, unet_config, unet_sizes

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family, low, high", [("sd15", 859e6, 861e6), ("sdxl", 2.56e9, 2.57e9)])
def test_published_unet_sizes(family, low, high):
    assert low <= count_parameters(unet_config(family)) <= high


def test_unet_config_is_a_copy():
    unet_config("sdxl")["sample_size"] = 8  # a benchmark shrinking its copy
    assert unet_config("sdxl")["sample_size"] == 128


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_trains_a_small_fraction(family):
    # Rank 64 on the authors' targets, convolutions included, trains ~7.7% of the UNet
    # (SDXL: 197M of 2.57B), more than attention-only LoRA would: bound at 10%.
    trainable = lora_sizes(family).params
    assert 0 < trainable < 0.10 * unet_sizes(family).params


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
    from dmdscale.tools.memory import GIB, critic_sizes

    params = unet_sizes("sdxl").params
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
    out = subprocess.run([sys.executable, "-m", "dmdscale.tools.memory", "--family", "sd3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "sd15" in out.stderr and "sdxl" in out.stderr
