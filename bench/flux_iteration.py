"""One DMD2 iteration at FLUX.1-dev size with random weights: seconds per iteration and peak memory.

The transformer is FLUX.1-dev's published architecture (its memory profile's config,
dmdscale.families.flow.memory.PROFILES["flux"], 11.9B parameters; width 3072) with random weights, so nothing is downloaded. The teacher is
frozen in bf16; the generator and the critic (fake score + TokenHead at the middle block) are
DeepSpeed ZeRO-3 engines with the optimizer offloaded, as the Ray workers build them (without
Ray: one process). Each iteration is a generator turn and a critic turn (ttur_ratio 1),
embedded guidance 3.5, GAN on, gradient checkpointing, bf16 autocast, micro-batch 1 at 512 px
(64x64 latents, 1024 image tokens + 512 text tokens).

Three full FLUX copies (teacher 24 GB in bf16, generator and critic 48 GB each in fp32, their
fp32 grads and host-side Adam states) do not fit one 141 GB GPU and a 128 GB host: the
memory planner says so (python -m dmdscale.memory --family flux). `--double/--single`
therefore build FLUX's width with fewer blocks; time and memory grow linearly in the blocks
(every block is the same size), so rows at two depths give the per-block cost and the
full-depth figure by extrapolation, which the JSON states next to the measured rows.

    python bench/flux_iteration.py --depths 2,4 5,10          # on a GPU machine
    python bench/flux_iteration.py --size tiny --depths 1,1 --out /tmp/x.json   # CPU smoke run

Writes bench/results/flux_iteration.json (with the device name).
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from iteration_bench import device_name, print_row, run_isolated, time_iterations

ROOT = Path(__file__).resolve().parents[1]
FULL_DEPTH = (19, 38)  # FLUX.1-dev: double-stream and single-stream blocks


def one_run(size: str, double: int, single: int, steps: int) -> dict:
    from diffusers import FluxTransformer2DModel

    from dmdscale.config import build_config
    from dmdscale.core.schedule import FlowMatchSchedule
    from dmdscale.core.step import Batch, DMD2Step
    from dmdscale.distributed.engine import DeepSpeedOptimizedModule, ensure_single_process_env
    from dmdscale.core.networks import Critic
    from dmdscale.families.flow.model import FlowTransformer, image_seq_len
    from dmdscale.models.heads import TokenHead
    from dmdscale.families.flow.memory import PROFILES
    from dmdscale.tools.memory import model_config
    from dmdscale.families.flow.tiny import SCHEDULERS, tiny_transformer_config

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    config = model_config(PROFILES["flux"]) if size == "flux" else tiny_transformer_config("flux")
    config |= {"num_layers": double, "num_single_layers": single}
    resolution, vae_scale = (512, 8) if size == "flux" else (32, 2)
    latent = resolution // vae_scale
    cfg = build_config({}, {"model.family": "flux", "model.teacher": "random-flux", "data.channels": 3,
                            "data.resolution": resolution, "train.mixed_precision": "bf16",
                            "train.gradient_checkpointing": True, "train.ttur_ratio": 1, "train.warmup_steps": 0,
                            "loss.guidance_scale": 3.5, "loss.gan_generator_weight": 3e-2,
                            "loss.gan_critic_weight": 1e-2, "scale.zero_stage": 3, "scale.offload_optimizer": True,
                            "scale.use_gpu": gpu})
    ensure_single_process_env()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    schedule = FlowMatchSchedule(SCHEDULERS["flux"], image_seq_len(resolution, vae_scale))
    with torch.device(device):
        transformer = FluxTransformer2DModel.from_config(config)
    teacher = FlowTransformer(transformer, schedule, "flux", vae_scale=vae_scale).to(device)
    generator = copy.deepcopy(teacher).train().requires_grad_(True)
    fake = copy.deepcopy(teacher).train().requires_grad_(True)
    teacher.cast_network(torch.bfloat16).eval().requires_grad_(False)
    for model in (generator, fake):
        model.enable_gradient_checkpointing()
    critic = Critic(fake, TokenHead.for_model(fake)).to(device)
    gen_engine = DeepSpeedOptimizedModule(generator, cfg.train, cfg.scale, 1, role="generator")
    critic_engine = DeepSpeedOptimizedModule(critic, cfg.train, cfg.scale, 1, role="critic")
    step = DMD2Step(cfg, teacher, gen_engine, critic_engine, device=device)
    batch = Batch(torch.randn(1, 16, latent, latent, device=device),
                  {"prompt_embeds": torch.randn(1, 512, config["joint_attention_dim"], device=device),
                   "pooled_prompt_embeds": torch.randn(1, config["pooled_projection_dim"], device=device)})
    seconds_per_iteration, first_seconds, metrics = time_iterations(step, batch, steps)
    return {"size": size, "double_blocks": double, "single_blocks": single,
            "parameters_per_transformer": sum(p.numel() for p in transformer.parameters()),
            "seconds_per_iteration": seconds_per_iteration, "first_iteration_seconds": first_seconds,
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
            "loss_dm": metrics.get("loss_dm")}


def extrapolate(rows: list[dict], key: str) -> float | None:
    """`key` at FLUX.1-dev's full depth from the two deepest rows, linear in parameters (the
    blocks are what grows; double blocks hold about twice a single block's parameters)."""
    good = sorted((r for r in rows if r.get(key) is not None), key=lambda r: r["parameters_per_transformer"])
    if len(good) < 2:
        return None
    a, b = good[-2], good[-1]
    slope = (b[key] - a[key]) / (b["parameters_per_transformer"] - a["parameters_per_transformer"])
    from dmdscale.families.flow.memory import PROFILES
    from dmdscale.tools.memory import model_sizes

    return b[key] + slope * (model_sizes(PROFILES["flux"]).params - b["parameters_per_transformer"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["flux", "tiny"], default="flux")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--depths", nargs="+", default=["2,4", "5,10"],
                        help="double,single block counts, one run each (full FLUX.1-dev: 19,38)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "flux_iteration.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: "double,single"
    args = parser.parse_args()
    if args.one:
        double, single = map(int, args.one.split(","))
        print_row(one_run(args.size, double, single, args.steps))
        return
    rows = [run_isolated(__file__, depth, ["--size", args.size, "--steps", str(args.steps)]) for depth in args.depths]
    device = device_name()
    result = {"device": device, "steps": args.steps, "rows": rows}
    if args.size == "flux":
        result["full_depth_extrapolated"] = {"seconds_per_iteration": extrapolate(rows, "seconds_per_iteration"),
                                             "peak_gpu_gib": extrapolate(rows, "peak_gpu_gib"),
                                             "note": "linear in parameters from the two largest rows; not measured"}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
