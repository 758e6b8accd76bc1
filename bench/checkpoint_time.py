"""Checkpoint save and restore time against model size.

For class-conditional UNets of growing width, one process builds the generator and critic
DeepSpeed engines as the Ray workers do (ZeRO-2, AdamW, gloo on CPU), takes one optimizer step
so the AdamW moments exist, then times `save_training_state` (both engines, RNG, position) and
`load_training_state` (weights-only) into fresh engines; median of --repeats.

    python bench/checkpoint_time.py [--widths 16 32 64 128] [--repeats 3]

Writes bench/results/checkpoint_time.json and rewrites its table in bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DModel
from readme_table import update_readme_table

from dmdscale.config import build_config
from dmdscale.core.sampling import NoiseStream
from dmdscale.core.schedule import NoiseSchedule
from dmdscale.distributed.checkpoint.state import TrainingState, load_training_state, rng_states, save_training_state
from dmdscale.distributed.engine import DeepSpeedOptimizedModule
from dmdscale.core.networks import Critic
from dmdscale.models.heads import ConvHead
from dmdscale.families.unet2d.model import ClassConditionalUNet, tiny_unet_config

ROOT = Path(__file__).resolve().parents[1]


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + " (CPU)"
    return platform.processor() or "CPU"


def engines(width: int, cfg) -> dict[str, DeepSpeedOptimizedModule]:
    torch.manual_seed(0)
    schedule = NoiseSchedule.ddpm()

    def unet() -> ClassConditionalUNet:
        return ClassConditionalUNet(UNet2DModel(**tiny_unet_config(32, 3, 10, width)), schedule)

    fake = unet()
    out = {"generator": DeepSpeedOptimizedModule(unet(), cfg.train, cfg.scale, 4, role="generator"),
           "critic": DeepSpeedOptimizedModule(Critic(fake, ConvHead.for_model(fake)), cfg.train, cfg.scale, 4, role="critic")}
    x, t, y = torch.randn(4, 3, 32, 32), torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,))
    for name, engine in out.items():
        model = engine.module.fake_score if name == "critic" else engine.module
        engine.backward(model(x, t, y).pow(2).mean())
        engine.step()
    return out


def measure(width: int, repeats: int, cfg) -> dict:
    source = engines(width, cfg)
    params = sum(p.numel() for e in source.values() for p in e.module.parameters())
    rng = NoiseStream(torch.Generator().manual_seed(0))
    saves, loads, size = [], [], 0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            save_training_state(tmp, TrainingState(10), source, rng_states(rng), rank=0)
            saves.append(time.perf_counter() - t0)
            size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
            target = engines(width, cfg)
            t0 = time.perf_counter()
            load_training_state(tmp, target, rank=0)
            loads.append(time.perf_counter() - t0)
    return {"width": width, "parameters": params, "checkpoint_mb": size / 2**20,
            "save_s": statistics.median(saves), "restore_s": statistics.median(loads),
            "save_mb_per_s": size / 2**20 / statistics.median(saves)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = build_config({}, {"scale.zero_stage": 2, "train.warmup_steps": 1})
    rows = [measure(w, args.repeats, cfg) for w in args.widths]
    result = {"device": device_name(), "zero_stage": 2, "workers": 1, "repeats": args.repeats, "rows": rows}
    out = ROOT / "bench" / "results" / "checkpoint_time.json"
    out.write_text(json.dumps(result, indent=2))
    lines = ["| generator + critic parameters | checkpoint MB | save s | restore s | save MB/s |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['parameters'] / 1e6:.2f} M | {r['checkpoint_mb']:.1f} | {r['save_s']:.3f} | "
              f"{r['restore_s']:.3f} | {r['save_mb_per_s']:.0f} |" for r in rows]
    update_readme_table("checkpoint_time", "\n".join(lines) + f"\n\nDevice: {result['device']}.")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
