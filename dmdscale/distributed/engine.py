"""DeepSpeed ZeRO engines behind the interface the DMD2 step uses (`dmdscale.core.optim`).

The generator and the critic each get their own engine (own optimizer, own ZeRO partitioning);
the frozen teacher stays a plain module, or with scale.shard_teacher is partitioned by an
optimizer-less ZeRO-3 engine (`shard_frozen`). gloo on CPU, NCCL on GPU: DeepSpeed uses the
process group Ray Train already created.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from dmdscale.config import ScaleConfig, TrainConfig
from dmdscale.core.optim import Role, learning_rate, warmup_lr_scheduler


def deepspeed_config(train: TrainConfig, scale: ScaleConfig, micro_batch: int, role: Role) -> dict[str, Any]:
    """The DeepSpeed JSON config for one trainable module (AdamW, clipping, ZeRO). The warm-up
    is the plain path's (`warmup_lr_scheduler`), handed to DeepSpeed as a client scheduler.

    Always an fp32 engine: fp32 parameters, gradients and Adam states. Under
    train.mixed_precision bf16 the step wraps the forwards in torch.autocast itself, as the DMD2
    authors do (accelerate's mixed_precision "no" + their own autocast). DeepSpeed's "bf16"
    mode would cast the module to bf16 (the step would then train bf16 weights); its
    "torch_autocast" section acts only inside engine.forward, which the step does not call
    (it runs engine.module), and would reduce Linear/Conv gradients in bf16.
    """
    zero: dict[str, Any] = {"stage": scale.zero_stage}
    if scale.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": scale.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: torch's AdamW instead of compiling DeepSpeed's fused kernel (~45 s on CPU).
            "params": {"lr": learning_rate(train, role), "betas": list(train.betas), "weight_decay": train.weight_decay,
                       "torch_adam": True},
        },
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": False},  # fp32 weights at every train.mixed_precision (see above)
        "steps_per_print": 10**9,  # progress goes through Ray Train reports, not DeepSpeed logs
        "wall_clock_breakdown": False,
    }


def ensure_single_process_env() -> None:
    """DeepSpeed outside a launcher needs the torch.distributed env vars (else it looks for MPI)."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(key, value)


def deepspeed_record_types() -> list[type]:
    """The only non-tensor classes DeepSpeed pickles into its checkpoints (optimizer files):
    plain records, allowed by name so loading stays `weights_only=True`."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | Path, map_location: Any = None, mmap: bool | None = None) -> Any:
    """torch.load that never unpickles arbitrary objects: tensors, containers and the few
    DeepSpeed records above. A checkpoint carrying anything else raises UnpicklingError."""
    with torch.serialization.safe_globals(deepspeed_record_types()):
        # Not torch.load: inside `every_torch_load_weights_only` that name leads back here.
        return torch.serialization.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def _forced_weights_only(f: Any, map_location: Any = None, *_: Any, mmap: bool | None = None, **__: Any) -> Any:
    """torch.load's signature; weights_only=False and pickle_module are dropped on purpose."""
    return load_weights_only(f, map_location, mmap=mmap)


@contextlib.contextmanager
def every_torch_load_weights_only() -> Iterator[None]:
    """Inside the block every torch.load is weights-only, whatever its caller asks: the net under
    DeepSpeed code that reads around the checkpoint engine (universal checkpoints, the ZeRO-3
    fp32 merge, or a later version's new path). Process-wide while it lasts; another thread's
    torch.load in that window is only made stricter."""
    original = torch.load
    torch.load = _forced_weights_only
    try:
        yield
    finally:
        torch.load = original


def _why_loading_is_unsafe(engine: Any) -> str | None:
    """None when DeepSpeed's checkpoint reads go through `load_weights_only`, else the reason."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None:
        return "the engine has no checkpoint_engine to route loads through"
    if getattr(checkpoint_engine, "load", None) is not load_weights_only:
        return f"{type(checkpoint_engine).__name__}.load could not be replaced"
    universal = getattr(engine, "load_universal_checkpoint", None)
    if universal is None or universal():
        # Universal checkpoints are read by the optimizers with torch.load(weights_only=False).
        return "universal checkpoint loading is on or cannot be checked"
    return None


def install_weights_only_loader(engine: Any) -> None:
    """Make DeepSpeed restore through `load_weights_only`, or refuse to build the engine: its own
    loader unpickles with weights_only=False, and checkpoints may come from shared storage."""
    with contextlib.suppress(AttributeError):  # no checkpoint engine, or a read-only load: reported below
        engine.checkpoint_engine.load = load_weights_only
    problem = _why_loading_is_unsafe(engine)
    if problem is not None:
        import deepspeed

        raise RuntimeError(f"DeepSpeed {deepspeed.__version__}: the weights-only checkpoint loader could not be "
                           f"installed ({problem}); install the DeepSpeed version pyproject.toml allows "
                           f"or update dmdscale/distributed/engine.py for this one")


# Every teacher parameter is partitioned, however small (DeepSpeed's default keeps those under
# 1e5 elements whole on every rank). A frozen module stores nothing but its parameters, and a
# module's parameters are fetched in one coalesced all-gather, so a bias travels with its weight.
FROZEN_PERSISTENCE_THRESHOLD = 0
ZERO3_ENGINE = "zero3_engine"  # where shard_frozen keeps the engine on the module


def shard_frozen(module: nn.Module) -> nn.Module:
    """`module` (frozen, on the host or its device) partitioned over the ranks by a ZeRO-3
    engine without optimizer (ZeRO-Inference): each rank keeps 1/world of every parameter
    (`param.ds_tensor`; `param.data` is empty) on this rank's device, and DeepSpeed's module
    hooks gather a submodule's parameters for its forward and free them after. The hooks fire
    for any call of a submodule, so `module(...)`, `module.features(...)` and the like all
    work; parameters used outside a submodule call (`module.some_layer.weight`) are empty.

    The parameters keep their dtype (cast first, e.g. `Denoiser.cast_network`). A collective
    call: every rank must shard the same module.
    """
    import deepspeed

    if not torch.distributed.is_initialized():
        ensure_single_process_env()
    config = {
        "train_micro_batch_size_per_gpu": 1,  # required by DeepSpeed's config check; nothing trains
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": FROZEN_PERSISTENCE_THRESHOLD},
        "bf16": {"enabled": False},  # keep the module's own dtype (DeepSpeed's bf16 mode would cast it)
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, _, _, _ = deepspeed.initialize(model=module, config=config,
                                           dist_init_required=not torch.distributed.is_initialized())
    # The engine owns the gather hooks and removes them when collected (DeepSpeedEngine.__del__),
    # so it lives as long as the module: kept in its __dict__, outside nn.Module's registries
    # (a registered submodule would put the engine into modules(), state_dict() and .to()).
    engine.module.__dict__[ZERO3_ENGINE] = engine
    return engine.module


def stored_numel(module: nn.Module) -> int:
    """Parameter elements this rank stores for `module`: each ZeRO-3 partition (padding
    included), else the whole parameter."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


class DeepSpeedOptimizedModule:
    """A module trained by a DeepSpeed engine; same interface as TorchOptimizedModule."""

    def __init__(self, module: nn.Module, train: TrainConfig, scale: ScaleConfig, micro_batch: int, *, role: Role):
        import deepspeed

        if not torch.distributed.is_initialized():
            ensure_single_process_env()
        params = [p for p in module.parameters() if p.requires_grad]
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, model_parameters=params, config=deepspeed_config(train, scale, micro_batch, role),
            # The same schedule as one plain process. DeepSpeed's WarmupLR starts at warmup_min_lr
            # for two optimizer steps, which made each engine's first two updates no-ops.
            lr_scheduler=functools.partial(warmup_lr_scheduler, train=train, role=role),
            dist_init_required=not torch.distributed.is_initialized(),
        )
        install_weights_only_loader(self.engine)
        self.module = self.engine.module

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else math.nan

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Full parameters on every rank inside the block (ZeRO-3 partitions them); a
        collective call, so every rank must enter it. No-op for ZeRO 0-2."""
        if self.engine.zero_optimization_partition_weights():
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield
        else:
            yield

    def full_state_dict(self) -> dict[str, Tensor]:
        """The module's full weights as CPU tensors (a collective call under ZeRO-3)."""
        with self.gathered():
            return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}

    def save(self, directory: str | Path, tag: str) -> None:
        """Engine state (weights, optimizer, LR scheduler) under directory/tag; a collective
        call: each rank writes its own ZeRO partition."""
        self.engine.save_checkpoint(str(directory), tag=tag, save_latest=False)

    def load(self, directory: str | Path, tag: str) -> None:
        """Restore what `save` wrote (same number of workers), weights-only."""
        with every_torch_load_weights_only():
            path, _ = self.engine.load_checkpoint(str(directory), tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag}' under {directory}")
