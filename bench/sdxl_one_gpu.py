"""One DMD2 iteration on an SDXL-size UNet on a single GPU: seconds per iteration and peak memory.

The UNet is SDXL's published architecture (its memory profile's config,
dmdscale.families.sd.memory.PROFILES["sdxl"], 2.57B parameters) with random weights, so nothing is downloaded; the teacher is frozen in bf16, and the
generator and critic (fake score + head) are DeepSpeed engines as the Ray workers build them.
Each iteration is a generator turn and a critic turn (ttur_ratio 1), CFG 8 on the teacher, GAN
on, gradient checkpointing, micro-batch 1 at 1024 px (128x128 latents). Set-ups, each in its own
process so one's memory cannot leak into the next:
  zero3_offload: full fine-tune, ZeRO-3 with the optimizer offloaded to CPU;
  lora: LoRA (r 64, alpha 8) on the generator, ZeRO-3 with offload for the critic too.
The DMD2 authors needed at least two 80 GB GPUs for SDXL; the question is whether one is enough.

    python bench/sdxl_one_gpu.py [--steps 3]          # on a GPU machine
    python bench/sdxl_one_gpu.py --size tiny --out /tmp/x.json   # a CPU smoke run of the script

Writes bench/results/sdxl_one_gpu.json (with the device name) and its table in bench/README.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from iteration_bench import device_name, print_row, run_isolated, time_iterations

ROOT = Path(__file__).resolve().parents[1]
SETUPS = {"zero3_offload": {"lora.enabled": False}, "lora": {"lora.enabled": True}}


def one_setup(setup: str, size: str, steps: int) -> dict:
    from diffusers import UNet2DConditionModel

    from dmdscale.config import build_config
    from dmdscale.core.schedule import NoiseSchedule
    from dmdscale.core.step import Batch, DMD2Step
    from dmdscale.distributed.engine import DeepSpeedOptimizedModule, ensure_single_process_env
    from dmdscale.families.text2image import lora_config
    from dmdscale.core.networks import Critic
    from dmdscale.models.heads import ConvHead
    from dmdscale.families.sd.model import TextConditionalUNet
    from dmdscale.families.sd.memory import PROFILES
    from dmdscale.tools.memory import unet_config
    from dmdscale.families.sd.tiny import tiny_unet_config

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    config = unet_config(PROFILES["sdxl"]) if size == "sdxl" else tiny_unet_config("sdxl")
    latent = int(config["sample_size"])
    cfg = build_config({}, {"model.family": "sdxl", "model.teacher": "random-sdxl", "data.channels": 3,
                            "train.mixed_precision": "bf16", "train.gradient_checkpointing": True,
                            "train.ttur_ratio": 1, "train.warmup_steps": 0, "loss.guidance_scale": 8.0,
                            "loss.gan_generator_weight": 5e-3, "loss.gan_critic_weight": 1e-2,
                            "scale.zero_stage": 3, "scale.offload_optimizer": True, "scale.use_gpu": gpu,
                            **SETUPS[setup]})
    ensure_single_process_env()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    schedule = NoiseSchedule.ddpm("scaled_linear", beta_start=0.00085, beta_end=0.012)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(config)
    # fp32 players under bf16 autocast, the teacher cast to bf16 after the copies (as build_players).
    teacher = TextConditionalUNet(unet, schedule, "sdxl").to(device)
    generator = copy.deepcopy(teacher).train().requires_grad_(not cfg.lora.enabled)
    if cfg.lora.enabled:
        generator.unet.add_adapter(lora_config(cfg))
    fake = copy.deepcopy(teacher).train().requires_grad_(True)
    teacher.cast_network(torch.bfloat16).eval().requires_grad_(False)
    for model in (generator, fake):
        model.unet.enable_gradient_checkpointing()
    critic = Critic(fake, ConvHead.for_model(fake)).to(device)
    gen_engine = DeepSpeedOptimizedModule(generator, cfg.train, cfg.scale, 1, role="generator")
    critic_engine = DeepSpeedOptimizedModule(critic, cfg.train, cfg.scale, 1, role="critic")
    step = DMD2Step(cfg, teacher, gen_engine, critic_engine, device=device)
    text = config["cross_attention_dim"]
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    batch = Batch(torch.randn(1, 4, latent, latent, device=device),
                  {"prompt_embeds": torch.randn(1, 77, text, device=device),
                   "pooled_prompt_embeds": torch.randn(1, pooled, device=device)})
    seconds_per_iteration, first_seconds, metrics = time_iterations(step, batch, steps)
    trainable = sum(p.numel() for p in generator.parameters() if p.requires_grad)
    return {"setup": setup, "size": size, "parameters_per_unet": sum(p.numel() for p in unet.parameters()),
            "generator_trainable_parameters": trainable, "latent_size": latent,
            "seconds_per_iteration": seconds_per_iteration, "first_iteration_seconds": first_seconds,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
            "loss_dm": metrics.get("loss_dm")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["sdxl", "tiny"], default="sdxl")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--setups", nargs="+", choices=sorted(SETUPS), default=list(SETUPS))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sdxl_one_gpu.json"))
    parser.add_argument("--one", choices=sorted(SETUPS), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.one:
        print_row(one_setup(args.one, args.size, args.steps))
        return
    rows = [run_isolated(__file__, setup, ["--size", args.size, "--steps", str(args.steps)]) for setup in args.setups]
    device = device_name()
    result = {"device": device, "steps": args.steps, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.size == "sdxl" and torch.cuda.is_available():
        sys.path.insert(0, str(Path(__file__).parent))
        from readme_table import update_readme_table

        table = ["| set-up | device | s / iteration | peak GPU GiB | trainable generator params |", "|---|---|---|---|---|"]
        table += [f"| {r['setup']} | {device} | {r.get('seconds_per_iteration', float('nan')):.2f} | "
                  f"{r.get('peak_gpu_gib') or float('nan'):.1f} | {r.get('generator_trainable_parameters', 0):,} |"
                  for r in rows]
        update_readme_table("sdxl_one_gpu", "\n".join(table))


if __name__ == "__main__":
    main()
