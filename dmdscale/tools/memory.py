"""Per-GPU memory planner for DMD2: will a set-up fit? SD1.5/SDXL UNets, SD3.5-Large/FLUX.1-dev transformers.

DMD2 holds three denoisers: the frozen teacher, the generator and the critic (fake score +
discriminator head); the generator and the critic are each a DeepSpeed engine (ZeRO 2 or 3,
AdamW, optionally with the optimizer offloaded to CPU). Precision is train.mixed_precision
bf16 as the DMD2 authors train: fp32 weights under bf16 autocast. Per GPU this module counts:

- teacher: frozen bf16 weights (2 bytes/param), replicated on every GPU (it is no engine); with
  `shard_teacher` (scale.shard_teacher, ZeRO-3 only) partitioned across all GPUs (DeepSpeed
  ZeRO-3 inference): 2 bytes/param / GPUs + what ZeRO-3 gathers at once (`frozen_weights`).
- generator and critic: fp32 engines (`dmdscale.distributed.engine.deepspeed_config`): fp32
  params, grads and Adam moments, and the fp32 partition DeepSpeed's ZeRO-1/2 optimizer clones
  even from fp32 params (ZeRO-3 reuses them). Per trained param: ZeRO-2 4 bytes replicated +
  16 / GPUs partitioned; ZeRO-3 16 / GPUs + the largest layer gathered in fp32 with its grads.
  Offload moves grads, the fp32 partition and Adam to host memory (DeepSpeed's own host
  estimate). With LoRA only the generator's adapters are trained; its frozen base is the
  teacher's fp32 copy (4 bytes/param): replicated under ZeRO-2, partitioned like every other
  engine parameter under ZeRO-3 (`frozen_weights`). The critic is always fully trained, as in
  the DMD2 authors' SDXL LoRA run.
- activations: an *estimate*, not a measurement (each profile's `activation_gib_per_image`).
- overhead: a fixed `overhead_gib` per GPU (default 2) for the CUDA context, NCCL buffers,
  allocator fragmentation and the short-lived no-grad forwards (teacher, DM-loss fake score).

Not counted: text encoders and VAE (assumed precomputed, or add them to the overhead; FLUX's and
SD3's T5-XXL alone is 4.7B parameters), data loader buffers, and anything DeepSpeed's estimators
leave out (communication buckets). Parameter counts come from the real architectures, built on
the meta device (nothing is allocated): SD1.5's UNet has 859.5M parameters, SDXL's 2.567B,
SD3.5-Large's transformer 8.057B and FLUX.1-dev's 11.901B.

This module is the method only. What differs per teacher family (its denoiser's diffusers class
and published config, its discriminator head, its activation estimates with the figures they
come from, its LoRA targets) is a `MemoryProfile` in the family's own folder,
`dmdscale/families/<name>/memory.py` (sd: SD1.5, SDXL; flow: SD3.5-Large, FLUX.1-dev): a new
family adds its profile there, and the planner stays as it is. Every planner function takes a
profile. The command plans the profiles the family registry carries (`dmdscale.memory`):

    python -m dmdscale.memory --family sdxl --gpus 1 2 4 8 --gpu-memory 80 --micro-batch 1 [--json]
    python -m dmdscale.memory --family sd3 flux --min-gpus   # fewest 80 GiB GPUs per set-up
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from dmdscale.config import LoraConfig

GIB = 1024**3
_LORA = LoraConfig()  # the training config's LoRA defaults: the DMD2 authors' rank and alpha
TEACHER_BYTES_PER_PARAM = 2  # bf16: the frozen teacher is cast after generator and critic are copied
LORA_BASE_BYTES_PER_PARAM = 4  # fp32: the generator's frozen base is its copy of the fp32 teacher
# The fp32 engines' model states, bytes per trained parameter.
PARAM_BYTES = GRAD_BYTES = MASTER_BYTES = 4  # MASTER: ZeRO-1/2's fp32 clone of its partition
ADAM_BYTES = 8  # exp_avg and exp_avg_sq, fp32
PRECISION = ("precision (train.mixed_precision bf16): fp32 generator and critic weights, grads and "
             "AdamW states, forwards under bf16 autocast; bf16 frozen teacher; fp32 LoRA base")

# ZeRO-3 gathers a partitioned module's parameters just before its forward and prefetches the
# next ones, up to stage3_prefetch_bucket_size parameters (DeepSpeed's default: the engines and
# the sharded teacher, `dmdscale.distributed.engine.shard_frozen`, leave it unset). The sharded
# teacher partitions every parameter; the engines keep those under DeepSpeed's
# stage3_param_persistence_threshold (1e5) whole on every GPU: ~3M in SD3.5-Large and FLUX.1-dev
# (norms, biases), not counted.
PREFETCH_BUCKET_PARAMS = 50_000_000
UNET_CLASS = "UNet2DConditionModel"  # the diffusers class whose config `unet_config` hands out
HEADS = ("conv", "token")  # MemoryProfile.head: what `discriminator_head` builds


@dataclass(frozen=True)
class MemoryProfile:
    """What the planner needs of one teacher family: its folder's `memory.py` holds it
    (`dmdscale/families/<name>/memory.py`), the family carries it, the command finds it there.

    Hashed by its content (a canonical JSON of every field), so the planner's caches key on what
    their numbers depend on: an equal profile built elsewhere shares their entries, a changed
    one (`dataclasses.replace`) gets its own, and two profiles never share one by name alone.
    Treat `config` as read-only; `model_config` hands out a copy to edit.
    """

    name: str  # the family's name: Plan.family and the command's --family choice
    model_class: str  # the denoiser's diffusers class, e.g. "UNet2DConditionModel"
    config: dict[str, Any]  # its published config (keys left out take diffusers' defaults)
    # The critic's discriminator head as training builds it: "conv" (ConvHead on a UNet's
    # bottleneck, config["block_out_channels"][-1] channels) or "token" (TokenHead on a
    # transformer's hidden states, `transformer_width` wide).
    head: str
    # GiB of activations one denoiser forward keeps for its backward, per image at the family's
    # native resolution, bf16, keyed by gradient checkpointing (False, True): ESTIMATES, each
    # family's file cites the figures beside its numbers.
    activation_gib_per_image: dict[bool, float]
    discriminator_share: float  # share of a full forward the discriminator runs, in activations
    # The generator's LoRA target module names; `lora_targets` drops those the model lacks.
    lora_targets: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"MemoryProfile {self.name!r}: head {self.head!r}; choose from {', '.join(HEADS)}")
        if set(self.activation_gib_per_image) != {False, True}:
            raise ValueError(f"MemoryProfile {self.name!r}: activation_gib_per_image needs an estimate "
                             f"without and with gradient checkpointing (keys False, True)")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))

    def __hash__(self) -> int:
        return hash(json.dumps(asdict(self), sort_keys=True, default=repr))


def peak_forwards(profile: MemoryProfile) -> float:
    """Forwards holding activations at an iteration's peak, in full forwards.

    Generator turn: its forward + the GAN term through the critic's discriminator share
    (1 + share); the teacher and DM-loss fake-score forwards run without gradients. Critic turn,
    the peak: the fake score's denoising forward + the discriminator on fake and real (1 + 2 share).
    """
    share = profile.discriminator_share
    return max(1 + share, 1 + 2 * share)


class ModuleSizes(NamedTuple):
    """Parameter counts DeepSpeed's estimators take."""

    params: int
    largest_layer: int  # the biggest single module's own parameters: what ZeRO-3 gathers at once


@dataclass(frozen=True)
class Plan:
    """One set-up's memory per GPU in GiB (cpu_gib: host memory per node) and whether it fits."""

    family: str  # the profile's name
    num_gpus: int
    zero_stage: int
    offload_optimizer: bool
    lora: bool
    shard_teacher: bool
    micro_batch: int
    gradient_checkpointing: bool
    teacher_gib: float  # bf16 weights: replicated, or partitioned + gathered with shard_teacher
    generator_gib: float  # engine states (+ frozen base weights with LoRA)
    critic_gib: float
    activations_gib: float
    overhead_gib: float
    total_gib: float
    cpu_gib: float  # DeepSpeed's host-memory estimate for the offloaded optimizer; 0 without offload
    gpu_memory_gib: float
    fits: bool


def unet_config(profile: MemoryProfile) -> dict[str, Any]:
    """The profile's published UNet config (a copy: callers may edit it, e.g. for a benchmark)."""
    if profile.model_class != UNET_CLASS:
        raise ValueError(f"{profile.name!r} is no UNet family: its denoiser is a {profile.model_class}")
    return model_config(profile)


def model_config(profile: MemoryProfile) -> dict[str, Any]:
    """The profile's published denoiser config, UNet or transformer (a copy)."""
    return copy.deepcopy(profile.config)


def transformer_width(profile: MemoryProfile) -> int:
    """A transformer's inner dim (heads x head dim): the width of the hidden states TokenHead reads."""
    config = profile.config
    return config["num_attention_heads"] * config["attention_head_dim"]


def meta_unet(config: dict[str, Any]) -> nn.Module:
    """The real diffusers UNet on the meta device: full structure, no memory."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def meta_model(profile: MemoryProfile) -> nn.Module:
    """The profile's real diffusers denoiser (UNet or transformer) on the meta device."""
    import diffusers

    with torch.device("meta"):
        return getattr(diffusers, profile.model_class).from_config(model_config(profile))


def module_sizes(model: nn.Module, trainable_only: bool = False) -> ModuleSizes:
    """Total and largest-module parameter counts (only those requiring grad if trainable_only)."""
    own = [sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad or not trainable_only)
           for m in model.modules()]
    return ModuleSizes(sum(own), max(own))


def count_parameters(config: dict[str, Any]) -> int:
    """Parameters of the UNet2DConditionModel a config describes."""
    return module_sizes(meta_unet(config)).params


@functools.lru_cache(maxsize=None)
def model_sizes(profile: MemoryProfile) -> ModuleSizes:
    """The profile's denoiser (teacher, generator, fake score): cached, a plan table asks often."""
    return module_sizes(meta_model(profile))


def discriminator_head(profile: MemoryProfile) -> nn.Module:
    """The critic's head as training builds it (`MemoryProfile.head`): ConvHead on a UNet's
    bottleneck, TokenHead on a transformer's hidden states at one depth."""
    from dmdscale.models.heads import ConvHead, TokenHead

    if profile.head == "conv":
        return ConvHead(profile.config["block_out_channels"][-1])
    return TokenHead(transformer_width(profile))


@functools.lru_cache(maxsize=None)
def critic_sizes(profile: MemoryProfile) -> ModuleSizes:
    """Fake score denoiser + its discriminator head, trained together."""
    with torch.device("meta"):
        head = module_sizes(discriminator_head(profile))
    denoiser = model_sizes(profile)
    return ModuleSizes(denoiser.params + head.params, max(denoiser.largest_layer, head.largest_layer))


@functools.lru_cache(maxsize=None)
def lora_targets(profile: MemoryProfile) -> tuple[str, ...]:
    """The generator's LoRA targets: the profile's that the denoiser has (matched as peft matches
    them: the module's name, or its last dotted parts)."""
    names = [name for name, _ in meta_model(profile).named_modules()]
    return tuple(t for t in profile.lora_targets if any(n == t or n.endswith("." + t) for n in names))


def lora_sizes(profile: MemoryProfile, rank: int = _LORA.rank, targets: Sequence[str] | None = None) -> ModuleSizes:
    """The generator's trainable LoRA adapter parameters (peft on the meta denoiser)."""
    return _lora_sizes(profile, rank, tuple(targets) if targets is not None else lora_targets(profile))


@functools.lru_cache(maxsize=None)
def _lora_sizes(profile: MemoryProfile, rank: int, targets: tuple[str, ...]) -> ModuleSizes:
    """Cached with every argument explicit, so default and spelled-out calls share an entry."""
    from peft import LoraConfig as PeftLoraConfig

    model = meta_model(profile).requires_grad_(False)
    model.add_adapter(PeftLoraConfig(r=rank, lora_alpha=_LORA.alpha, target_modules=list(targets),
                                     init_lora_weights="gaussian"))
    return module_sizes(model, trainable_only=True)


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


def frozen_weights(sizes: ModuleSizes, bytes_per_param: int, num_gpus: int, partitioned: bool) -> float:
    """Bytes per GPU of frozen weights (no grads, no optimizer): replicated, or partitioned by
    ZeRO-3 across num_gpus plus what it holds gathered at once: the largest layer and the
    prefetched next ones (PREFETCH_BUCKET_PARAMS)."""
    if not partitioned:
        return bytes_per_param * sizes.params
    gathered = min(sizes.largest_layer + PREFETCH_BUCKET_PARAMS, sizes.params)
    return bytes_per_param * (sizes.params / num_gpus + gathered)


def activations_gib(profile: MemoryProfile, micro_batch: int, gradient_checkpointing: bool) -> float:
    """Estimated activation memory at an iteration's peak (the profile's activation_gib_per_image)."""
    return peak_forwards(profile) * micro_batch * profile.activation_gib_per_image[gradient_checkpointing]


def plan(profile: MemoryProfile, num_gpus: int, zero_stage: int, offload_optimizer: bool, lora: bool,
         micro_batch: int = 1, gradient_checkpointing: bool = True, gpu_memory_gib: float = 80.0,
         *, shard_teacher: bool = False, overhead_gib: float = 2.0, gpus_per_node: int = 8,
         lora_rank: int = _LORA.rank, lora_targets: Sequence[str] | None = None) -> Plan:
    """Memory per GPU of one DMD2 set-up (micro_batch images per GPU) and whether it fits."""
    if micro_batch < 1:
        raise ValueError(f"micro_batch={micro_batch}: at least 1 image per GPU")
    if shard_teacher and zero_stage != 3:
        raise ValueError(f"shard_teacher partitions the teacher with ZeRO-3; zero_stage={zero_stage} cannot")
    denoiser = model_sizes(profile)
    # Under ZeRO-3 the generator engine partitions its frozen LoRA base like its other params.
    frozen_base = frozen_weights(denoiser, LORA_BASE_BYTES_PER_PARAM, num_gpus, zero_stage == 3) if lora else 0
    trained = lora_sizes(profile, lora_rank, lora_targets) if lora else denoiser
    gen_gpu, gen_cpu = engine_states(trained, zero_stage, num_gpus, offload_optimizer, gpus_per_node)
    critic_gpu, critic_cpu = engine_states(critic_sizes(profile), zero_stage, num_gpus,
                                           offload_optimizer, gpus_per_node)
    parts = {
        "teacher_gib": frozen_weights(denoiser, TEACHER_BYTES_PER_PARAM, num_gpus, shard_teacher) / GIB,
        "generator_gib": (gen_gpu + frozen_base) / GIB,
        "critic_gib": critic_gpu / GIB,
        "activations_gib": activations_gib(profile, micro_batch, gradient_checkpointing),
        "overhead_gib": overhead_gib,
    }
    total = sum(parts.values())
    return Plan(profile.name, num_gpus, zero_stage, offload_optimizer, lora, shard_teacher, micro_batch,
                gradient_checkpointing, **parts, total_gib=total,
                cpu_gib=(gen_cpu + critic_cpu) / GIB, gpu_memory_gib=gpu_memory_gib,
                fits=total <= gpu_memory_gib)


def plan_table(profile: MemoryProfile, num_gpus_options: Sequence[int] = (1, 2, 4, 8), gpu_memory_gib: float = 80.0,
               micro_batch: int = 1, overhead_gib: float = 2.0, shard_teacher: bool = False) -> list[Plan]:
    """Every {ZeRO-2, ZeRO-3} x {offload off, on} x {full, LoRA} set-up, with checkpointing
    (ZeRO-3 only with shard_teacher: the only stage that can shard the teacher)."""
    return [plan(profile, gpus, stage, offload, lora, micro_batch, True, gpu_memory_gib,
                 shard_teacher=shard_teacher, overhead_gib=overhead_gib)
            for gpus in num_gpus_options for stage in ((3,) if shard_teacher else (2, 3))
            for offload in (False, True) for lora in (False, True)]


def gpu_counts(max_gpus: int = 128, gpus_per_node: int = 8) -> list[int]:
    """The GPU counts a job can have: 1..gpus_per_node on one node, then full nodes."""
    return list(range(1, gpus_per_node + 1)) + list(range(2 * gpus_per_node, max_gpus + 1, gpus_per_node))


def min_gpus(profile: MemoryProfile, zero_stage: int, offload_optimizer: bool, lora: bool, *,
             shard_teacher: bool = False, gpu_memory_gib: float = 80.0, micro_batch: int = 1, overhead_gib: float = 2.0,
             max_gpus: int = 128) -> Plan | None:
    """The plan at the fewest GPUs (of `gpu_counts`) on which the set-up fits, with
    checkpointing; None if it fits on none up to max_gpus."""
    for gpus in gpu_counts(max_gpus):
        p = plan(profile, gpus, zero_stage, offload_optimizer, lora, micro_batch, True, gpu_memory_gib,
                 shard_teacher=shard_teacher, overhead_gib=overhead_gib)
        if p.fits:
            return p
    return None


def min_gpus_table(profile: MemoryProfile, gpu_memory_gib: float = 80.0, micro_batch: int = 1,
                   overhead_gib: float = 2.0, max_gpus: int = 128) -> list[Plan]:
    """min_gpus for every {ZeRO-2, ZeRO-3 (+ teacher sharded)} x {offload off, on} x {full, LoRA}
    set-up; a set-up that fits nowhere shows its plan at max_gpus (fits: no)."""
    setups = [(stage, offload, lora, shard) for stage, shard in ((2, False), (3, False), (3, True))
              for offload in (False, True) for lora in (False, True)]
    kwargs = {"gpu_memory_gib": gpu_memory_gib, "micro_batch": micro_batch, "overhead_gib": overhead_gib}
    return [min_gpus(profile, stage, offload, lora, shard_teacher=shard, max_gpus=max_gpus, **kwargs)
            or plan(profile, max_gpus, stage, offload, lora, shard_teacher=shard, **kwargs)
            for stage, offload, lora, shard in setups]


def _json_row(p: Plan) -> dict[str, Any]:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(p).items()}


def _print_table(rows: list[Plan], what: str = "") -> None:
    """Short headers, units in the title: the table fits an 80-column terminal."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    first = rows[0]
    table = Table(title=f"DMD2 memory, GiB per GPU ({first.gpu_memory_gib:g} GiB GPUs, micro-batch "
                        f"{first.micro_batch}, gradient checkpointing){what}",
                  caption=f"total: teacher + generator + critic + activations (estimated) + "
                          f"{first.overhead_gib:g} GiB overhead; shard: teacher partitioned (ZeRO-3); "
                          "CPU: host GiB per node for the offloaded optimizer",
                  box=box.SIMPLE_HEAD, padding=(0, 0))
    for h in ("family", "gpus", "zero", "offl.", "lora", "shard", "teach.", "gen.", "critic",
              "activ.", "total", "CPU", "fits"):
        table.add_column(h, justify="left" if h == "family" else "right", no_wrap=True)
    yes = {True: "yes", False: "no"}
    for p in rows:
        table.add_row(p.family, str(p.num_gpus), str(p.zero_stage), yes[p.offload_optimizer], yes[p.lora],
                      yes[p.shard_teacher],
                      *(f"{v:.1f}" for v in (p.teacher_gib, p.generator_gib, p.critic_gib,
                                             p.activations_gib, p.total_gib)),
                      f"{p.cpu_gib:.0f}", yes[p.fits])
    console = Console()
    console.print(table)
    console.print(PRECISION, soft_wrap=False)


def main(argv: Sequence[str] | None, profiles: Mapping[str, MemoryProfile], *,
         default: Sequence[str] = ()) -> None:
    """The planner's command line (`python -m dmdscale.memory`, which hands it the family
    registry's profiles) over `profiles`, name -> profile: --family chooses among their names,
    `default` (those of them in `profiles`, else the first profile) when it is not given."""
    parser = argparse.ArgumentParser(prog="python -m dmdscale.memory", description=__doc__.split("\n")[0])
    if not profiles:
        parser.error("no memory profile to plan: no family carries one")
    defaults = [name for name in default if name in profiles] or list(profiles)[:1]
    parser.add_argument("--family", choices=list(profiles), nargs="+", default=defaults)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="GPU counts to plan for")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    parser.add_argument("--micro-batch", type=int, default=1, help="images per GPU per step")
    parser.add_argument("--overhead", type=float, default=2.0, help="GiB per GPU for CUDA context etc.")
    parser.add_argument("--shard-teacher", action="store_true",
                        help="partition the frozen teacher with ZeRO-3 (scale.shard_teacher): ZeRO-3 rows only")
    parser.add_argument("--min-gpus", action="store_true",
                        help="instead of --gpus: the fewest GPUs each set-up fits on (with and without "
                             "--shard-teacher), up to --max-gpus")
    parser.add_argument("--max-gpus", type=int, default=128, help="largest GPU count --min-gpus tries")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    # The planner only does arithmetic: naming DeepSpeed's CPU accelerator skips its device
    # auto-detection, whose warning would otherwise land on stdout, in the JSON.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        if args.min_gpus:
            rows = [p for family in args.family for p in min_gpus_table(
                profiles[family], args.gpu_memory, args.micro_batch, args.overhead, args.max_gpus)]
        else:
            rows = [p for family in args.family for p in plan_table(
                profiles[family], args.gpus, args.gpu_memory, args.micro_batch, args.overhead, args.shard_teacher)]
    except ValueError as e:
        parser.error(str(e))
    if args.json:
        print(json.dumps([_json_row(p) for p in rows], indent=1))
    else:
        _print_table(rows, ": the fewest GPUs each set-up fits on" if args.min_gpus else "")
