"""Per-GPU memory planner for DMD2 on the SD1.5 and SDXL UNets: will a set-up fit?

DMD2 holds three UNets: the frozen teacher, the generator and the critic (fake score UNet +
discriminator head); the generator and the critic are each a DeepSpeed engine (ZeRO 2 or 3,
AdamW, optionally with the optimizer offloaded to CPU). Precision is train.mixed_precision
bf16 as the DMD2 authors train: fp32 weights under bf16 autocast. Per GPU this module counts:

- teacher: frozen bf16 weights (2 bytes/param), replicated on every GPU (it is no engine).
- generator and critic: fp32 engines (`dmdscale.distributed.engine.deepspeed_config`): fp32
  params, grads and Adam moments, and the fp32 partition DeepSpeed's ZeRO-1/2 optimizer clones
  even from fp32 params (ZeRO-3 reuses them). Per trained param: ZeRO-2 4 bytes replicated +
  16 / GPUs partitioned; ZeRO-3 16 / GPUs + the largest layer gathered in fp32 with its grads.
  Offload moves grads, the fp32 partition and Adam to host memory (DeepSpeed's own host
  estimate). With LoRA only the generator's adapters are trained; its frozen base is the
  teacher's fp32 copy (4 bytes/param, replicated: an upper bound under ZeRO-3, which
  partitions it too). The critic is always fully trained, as in the DMD2 authors' SDXL LoRA run.
- activations: an *estimate*, not a measurement (see `ACTIVATION_GIB_PER_IMAGE`).
- overhead: a fixed `overhead_gib` per GPU (default 2) for the CUDA context, NCCL buffers,
  allocator fragmentation and the short-lived no-grad forwards (teacher, DM-loss fake score).

Not counted: text encoders and VAE (assumed precomputed, or add them to the overhead), data
loader buffers, and anything DeepSpeed's estimators leave out (communication buckets).
Parameter counts come from the real architectures, built on the meta device (nothing is
allocated): SD1.5's UNet has 859.5M parameters and SDXL's 2.567B.

    python -m dmdscale.tools.memory --family sdxl --gpus 1 2 4 8 --gpu-memory 80 --micro-batch 1 [--json]
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from dmdscale.config import LoraConfig

GIB = 1024**3
_LORA = LoraConfig()  # the training config's LoRA defaults: the DMD2 authors' rank and targets
TEACHER_BYTES_PER_PARAM = 2  # bf16: the frozen teacher is cast after generator and critic are copied
LORA_BASE_BYTES_PER_PARAM = 4  # fp32: the generator's frozen base is its copy of the fp32 teacher
# The fp32 engines' model states, bytes per trained parameter.
PARAM_BYTES = GRAD_BYTES = MASTER_BYTES = 4  # MASTER: ZeRO-1/2's fp32 clone of its partition
ADAM_BYTES = 8  # exp_avg and exp_avg_sq, fp32
PRECISION = ("precision (train.mixed_precision bf16): fp32 generator and critic weights, grads and "
             "AdamW states, forwards under bf16 autocast; bf16 frozen teacher; fp32 LoRA base")

# Published diffusers configs (unet/config.json) of stable-diffusion-v1-5/stable-diffusion-v1-5
# and stabilityai/stable-diffusion-xl-base-1.0; keys left out take diffusers' defaults, which
# match those files.
_COMMON: dict[str, Any] = {
    "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "act_fn": "silu",
    "center_input_sample": False, "downsample_padding": 1, "flip_sin_to_cos": True,
    "freq_shift": 0, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
}
UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": _COMMON | {
        "sample_size": 64,
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    },
    "sdxl": _COMMON | {
        "sample_size": 128,
        "block_out_channels": [320, 640, 1280],
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20],
        "cross_attention_dim": 2048,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True,
    },
}
FAMILIES = tuple(UNET_CONFIGS)

# GiB of activations one UNet forward keeps for its backward, per image at the family's native
# resolution (SD1.5: 512 px, 64x64 latents; SDXL: 1024 px, 128x128 latents), bf16, keyed by
# gradient checkpointing. ESTIMATES, not measured by this project: rough public figures from
# fine-tuning these UNets (SDXL about 20-25 GB per image without checkpointing, 3-4 GB with;
# SD1.5 about 6 GB without, 1 GB with). Replace them with a measurement
# (torch.cuda.max_memory_allocated around one step) when a GPU is at hand.
ACTIVATION_GIB_PER_IMAGE: dict[str, dict[bool, float]] = {
    "sd15": {False: 6.0, True: 1.0},
    "sdxl": {False: 22.0, True: 3.5},
}
# The discriminator reads the fake score's mid-block output, so its forwards run the encoder
# and mid block only: a bit under half the UNet (the decoder has 3 ResNets per level, the
# encoder 2); 0.5 rounds up.
ENCODER_SHARE = 0.5
# Forwards holding activations at an iteration's peak, in full UNet forwards. Generator turn:
# its forward + the GAN term through the critic's encoder (1 + 0.5); the teacher and DM-loss
# fake-score forwards run without gradients. Critic turn, the peak: the fake score's denoising
# forward + the discriminator on fake and on real images (1 + 2 x 0.5).
PEAK_FORWARDS = max(1 + ENCODER_SHARE, 1 + 2 * ENCODER_SHARE)


class ModuleSizes(NamedTuple):
    """Parameter counts DeepSpeed's estimators take."""

    params: int
    largest_layer: int  # the biggest single module's own parameters: what ZeRO-3 gathers at once


@dataclass(frozen=True)
class Plan:
    """One set-up's memory per GPU in GiB (cpu_gib: host memory per node) and whether it fits."""

    family: str
    num_gpus: int
    zero_stage: int
    offload_optimizer: bool
    lora: bool
    micro_batch: int
    gradient_checkpointing: bool
    teacher_gib: float
    generator_gib: float  # engine states (+ frozen base weights with LoRA)
    critic_gib: float
    activations_gib: float
    overhead_gib: float
    total_gib: float
    cpu_gib: float  # DeepSpeed's host-memory estimate for the offloaded optimizer; 0 without offload
    gpu_memory_gib: float
    fits: bool


def unet_config(family: str) -> dict[str, Any]:
    """The family's published UNet config (a copy: callers may edit it, e.g. for a benchmark)."""
    if family not in UNET_CONFIGS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    return copy.deepcopy(UNET_CONFIGS[family])


def meta_unet(config: dict[str, Any]) -> nn.Module:
    """The real diffusers UNet on the meta device: full structure, no memory."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def module_sizes(model: nn.Module, trainable_only: bool = False) -> ModuleSizes:
    """Total and largest-module parameter counts (only those requiring grad if trainable_only)."""
    own = [sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad or not trainable_only)
           for m in model.modules()]
    return ModuleSizes(sum(own), max(own))


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of the UNet2DConditionModel a config describes."""
    return module_sizes(meta_unet(config)).params


@functools.lru_cache(maxsize=None)
def unet_sizes(family: str) -> ModuleSizes:
    """The family's UNet (teacher, generator, fake score): cached, a plan table asks often."""
    return module_sizes(meta_unet(unet_config(family)))


@functools.lru_cache(maxsize=None)
def critic_sizes(family: str) -> ModuleSizes:
    """Fake score UNet + the ConvHead discriminator on its bottleneck, trained together."""
    from dmdscale.models.heads import ConvHead

    with torch.device("meta"):
        head = module_sizes(ConvHead(unet_config(family)["block_out_channels"][-1]))
    unet = unet_sizes(family)
    return ModuleSizes(unet.params + head.params, max(unet.largest_layer, head.largest_layer))


def lora_sizes(family: str, rank: int = _LORA.rank,
               targets: Sequence[str] = tuple(_LORA.targets)) -> ModuleSizes:
    """The generator's trainable LoRA adapter parameters (peft on the meta UNet)."""
    return _lora_sizes(family, rank, tuple(targets))


@functools.lru_cache(maxsize=None)
def _lora_sizes(family: str, rank: int, targets: tuple[str, ...]) -> ModuleSizes:
    """Cached with every argument explicit, so default and spelled-out calls share an entry."""
    from peft import LoraConfig as PeftLoraConfig

    unet = meta_unet(unet_config(family)).requires_grad_(False)
    unet.add_adapter(PeftLoraConfig(r=rank, lora_alpha=_LORA.alpha, target_modules=list(targets),
                                    init_lora_weights="gaussian"))
    return module_sizes(unet, trainable_only=True)


def _topology(num_gpus: int, gpus_per_node: int) -> tuple[int, int]:
    """(nodes, GPUs per node): one node up to gpus_per_node GPUs, then full nodes."""
    nodes = math.ceil(num_gpus / gpus_per_node)
    per_node = min(num_gpus, gpus_per_node)
    if num_gpus < 1 or nodes * per_node != num_gpus:
        raise ValueError(f"num_gpus={num_gpus}: use 1..{gpus_per_node} GPUs or a multiple of {gpus_per_node}")
    return nodes, per_node


def engine_states(sizes: ModuleSizes, zero_stage: int, num_gpus: int, offload_optimizer: bool,
                  gpus_per_node: int = 8) -> tuple[int, int]:
    """(GPU bytes per GPU, CPU bytes per node) of one fp32 engine's model states.

    DeepSpeed's own estimators count 16-bit params and grads (its "bf16" mode), which the
    engines no longer use, so the GPU side is counted here (see the module docstring); the
    host side of an offloaded optimizer (fp32 either way) is DeepSpeed's estimate. The engines
    are built without `deepspeed.zero.Init` and offload only the optimizer.
    """
    nodes, per_node = _topology(num_gpus, gpus_per_node)
    params, partitioned = sizes.params, sizes.params / num_gpus
    if zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        gpu = PARAM_BYTES * params  # replicated
        if not offload_optimizer:
            gpu += (MASTER_BYTES + GRAD_BYTES + ADAM_BYTES) * partitioned
        cpu, _ = estimate_zero2_model_states_mem_needs(params, per_node, nodes, cpu_offload=True)
    elif zero_stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        gpu = (PARAM_BYTES + GRAD_BYTES) * sizes.largest_layer + PARAM_BYTES * partitioned
        if not offload_optimizer:
            gpu += (GRAD_BYTES + ADAM_BYTES) * partitioned
        cpu, _, _ = estimate_zero3_model_states_mem_needs(
            params, sizes.largest_layer, per_node, nodes, cpu_offload=True, cpu_offload_params=False,
            zero_init=False)
    else:
        raise ValueError(f"zero_stage={zero_stage}: the planner covers ZeRO stages 2 and 3")
    return int(gpu), int(cpu) if offload_optimizer else 0


def activations_gib(family: str, micro_batch: int, gradient_checkpointing: bool) -> float:
    """Estimated activation memory at an iteration's peak (see ACTIVATION_GIB_PER_IMAGE)."""
    return PEAK_FORWARDS * micro_batch * ACTIVATION_GIB_PER_IMAGE[family][gradient_checkpointing]


def plan(family: str, num_gpus: int, zero_stage: int, offload_optimizer: bool, lora: bool,
         micro_batch: int = 1, gradient_checkpointing: bool = True, gpu_memory_gib: float = 80.0,
         *, overhead_gib: float = 2.0, gpus_per_node: int = 8, lora_rank: int = _LORA.rank,
         lora_targets: Sequence[str] = tuple(_LORA.targets)) -> Plan:
    """Memory per GPU of one DMD2 set-up (micro_batch images per GPU) and whether it fits."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch={micro_batch}: at least 1 image per GPU")
    unet = unet_sizes(family)
    frozen_base = unet.params * LORA_BASE_BYTES_PER_PARAM if lora else 0
    trained = lora_sizes(family, lora_rank, lora_targets) if lora else unet
    gen_gpu, gen_cpu = engine_states(trained, zero_stage, num_gpus, offload_optimizer, gpus_per_node)
    critic_gpu, critic_cpu = engine_states(critic_sizes(family), zero_stage, num_gpus,
                                           offload_optimizer, gpus_per_node)
    parts = {
        "teacher_gib": unet.params * TEACHER_BYTES_PER_PARAM / GIB,
        "generator_gib": (gen_gpu + frozen_base) / GIB,
        "critic_gib": critic_gpu / GIB,
        "activations_gib": activations_gib(family, micro_batch, gradient_checkpointing),
        "overhead_gib": overhead_gib,
    }
    total = sum(parts.values())
    return Plan(family, num_gpus, zero_stage, offload_optimizer, lora, micro_batch,
                gradient_checkpointing, **parts, total_gib=total,
                cpu_gib=(gen_cpu + critic_cpu) / GIB, gpu_memory_gib=gpu_memory_gib,
                fits=total <= gpu_memory_gib)


def plan_table(family: str, num_gpus_options: Sequence[int] = (1, 2, 4, 8), gpu_memory_gib: float = 80.0,
               micro_batch: int = 1, overhead_gib: float = 2.0) -> list[Plan]:
    """Every {ZeRO-2, ZeRO-3} x {offload off, on} x {full, LoRA} set-up, with checkpointing."""
    return [plan(family, gpus, stage, offload, lora, micro_batch, True, gpu_memory_gib,
                 overhead_gib=overhead_gib)
            for gpus in num_gpus_options for stage in (2, 3)
            for offload in (False, True) for lora in (False, True)]


def _json_row(p: Plan) -> dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(p).items()}


def _print_table(rows: list[Plan]) -> None:
    """Short headers, units in the title: the table fits an 80-column terminal."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    first = rows[0]
    table = Table(title=f"DMD2 memory, GiB per GPU ({first.gpu_memory_gib:g} GiB GPUs, micro-batch "
                        f"{first.micro_batch}, gradient checkpointing)",
                  caption=f"total: teacher + generator + critic + activations (estimated) + "
                          f"{first.overhead_gib:g} GiB overhead; CPU: host GiB per node for the "
                          "offloaded optimizer",
                  box=box.SIMPLE_HEAD, padding=(0, 0))
    for h in ("family", "gpus", "zero", "offload", "lora", "teacher", "generator", "critic",
              "activ.", "total", "CPU", "fits"):
        table.add_column(h, justify="left" if h == "family" else "right", no_wrap=True)
    yes = {True: "yes", False: "no"}
    for p in rows:
        table.add_row(p.family, str(p.num_gpus), str(p.zero_stage), yes[p.offload_optimizer], yes[p.lora],
                      *(f"{v:.1f}" for v in (p.teacher_gib, p.generator_gib, p.critic_gib,
                                             p.activations_gib, p.total_gib, p.cpu_gib)),
                      yes[p.fits])
    console = Console()
    console.print(table)
    console.print(PRECISION, soft_wrap=False)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dmdscale.tools.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=FAMILIES, default="sdxl")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="GPU counts to plan for")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    parser.add_argument("--micro-batch", type=int, default=1, help="images per GPU per step")
    parser.add_argument("--overhead", type=float, default=2.0, help="GiB per GPU for CUDA context etc.")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    # The planner only does arithmetic: naming DeepSpeed's CPU accelerator skips its device
    # auto-detection, whose warning would otherwise land on stdout, in the JSON.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        rows = plan_table(args.family, args.gpus, args.gpu_memory, args.micro_batch, args.overhead)
    except ValueError as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps([_json_row(p) for p in rows], indent=1))
    else:
        _print_table(rows)


if __name__ == "__main__":
    main()
