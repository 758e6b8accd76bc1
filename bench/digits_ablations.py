"""digits ablations: DMD2's quality levers, each at the same iteration budget, two seeds or more.

Plain-process runs of the real DMD2Step (the code every Ray worker runs) on the cached digits
teacher, with in-memory batches: fast, and the Ray path is covered by the tests. Every run is
evaluated the way the demo is (same labels, noise and feature space): FID and KID of
`eval.num_samples` student samples against the held-out digits (digit-classifier features),
class accuracy, and the pixel-space recall and SWD that see lost variety. The teacher is
evaluated at its 50-step sampler with the same seeds, so "student vs teacher" is paired.

    python bench/digits_ablations.py                       # every variant, seeds 0 1
    python bench/digits_ablations.py --variants no_gan gan --seeds 0 1 2
    python bench/digits_ablations.py --explore loss.gan_max_step=250 train.lr=3e-4   # one ad-hoc run
    python bench/digits_ablations.py --explore --then generator.timesteps=[999,749,499,249]  # staged

Writes bench/results/digits_ablations.json (each run as it finishes, so a partial sweep keeps
what it measured) and the table in bench/README.md. `--explore` runs go to
bench/results/digits_explore.jsonl: the tuning behind digits.yaml's comments.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from readme_table import update_readme_table

from dmdscale.config import Config, load_config
from dmdscale.core.ema import GeneratorEMA, ema_name
from dmdscale.core.loop import train_loop
from dmdscale.core.optim import TorchOptimizedModule
from dmdscale.core.sampling import teacher_sample
from dmdscale.core.step import Batch, DMD2Step
from dmdscale.families.unet2d.evaluator import eval_spec
from dmdscale.distributed.worker import build_players
from dmdscale.eval.metrics import class_accuracy, compute_fid_kid, generate, sample_quality_of, sample_student
from dmdscale.eval.plots import first_per_class, save_grid
from dmdscale.families import resolve
from dmdscale.families.unet2d.model import load_unet

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CONFIG = ROOT / "pipelines" / "configs" / "digits.yaml"
GRIDS = RESULTS / "grids"  # sample grids of the --explore runs

# The GAN as dmdscale had it before issue 13: noise levels uniform over all of [0, T), the
# small conv head, a fixed weight (the EMA, new in the same change, is kept in every variant;
# each run reports its raw weights too).
GAN_BEFORE = {"loss.gan_generator_weight": 3e-3, "loss.gan_critic_weight": 1e-2, "loss.gan_timesteps": "uniform",
              "loss.gan_max_step": 999, "loss.gan_head": "conv", "loss.gan_augment": [], "loss.gan_grad_ratio": None}
# Label-free figures that see lost variety: recall and SWD in pixels, and the spread of each
# sample's mean colour (brightness on grey data) against the real data's; colour ones for RGB.
VARIETY_FIGURES = ("recall_pixels", "precision_pixels", "coverage_pixels", "swd_pixels",
                   "mean_color_spread_ratio_pixels", "channel_std_0_ratio_pixels", "colorfulness_ratio_pixels",
                   "saturation_bright_ratio_pixels")
NO_GAN = {"loss.gan_generator_weight": 0.0, "loss.gan_critic_weight": 0.0, "loss.gan_grad_ratio": None}
FOUR_STEPS = {"generator.timesteps": [999, 749, 499, 249]}

# name -> (overrides on digits.yaml, what it shows). Two-stage runs are their own kind (below).
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "defaults": ({}, "digits.yaml as shipped"),
    "no_gan": (NO_GAN, "DM loss only (TTUR 5)"),
    "gan_before": (GAN_BEFORE, "the GAN before issue 13 (uniform t over [0, T), conv head, w_g 3e-3)"),
    "gan_fixed_weight": ({"loss.gan_grad_ratio": None, "loss.gan_generator_weight": 3e-3}, "defaults, w_g fixed at 3e-3"),
    "gan_calibrated": ({"loss.gan_grad_ratio": 0.3}, "defaults, w_g calibrated to 0.3 of the DM gradient"),
    "gan_augment": ({"loss.gan_augment": ["shift", "cutout"]}, "defaults + DiffAugment shift, cutout"),
    "ttur_1": ({"train.ttur_ratio": 1}, "TTUR off (generator every iteration)"),
    "four_step_backsim": ({**FOUR_STEPS, "generator.backward_simulation": True}, "4 steps, backward simulation"),
    "four_step_noised_real": ({**FOUR_STEPS, "generator.backward_simulation": False}, "4 steps, noised real inputs"),
}
DEFAULT_VARIANTS = ["defaults", "no_gan", "gan_before", "ttur_1", "four_step_backsim", "four_step_noised_real"]


SHAPES_TRAIN, SHAPES_HELD_OUT = 3000, 1000  # coloured shapes (--data shapes): images per split


def shapes_overrides(cache_dir: str) -> dict[str, Any]:
    """--data shapes: RGB circles, squares and triangles on black, hue spread over the whole
    wheel and free of the class (`dmdscale.data.shapes`), written once as two image folders
    (metadata.jsonl with labels) and read through the image-folder path, as a user's data is."""
    from dmdscale.data.shapes import colored_shapes
    from dmdscale.data.sources import build_imagefolder

    root = Path(cache_dir).expanduser() / "bench" / f"shapes-{SHAPES_TRAIN}-{SHAPES_HELD_OUT}"
    folders = {}
    for split, n, seed in (("train", SHAPES_TRAIN, 0), ("held_out", SHAPES_HELD_OUT, 1000)):
        folders[split] = root / split
        if not (folders[split] / "metadata.jsonl").is_file():
            images, labels = colored_shapes(n, seed)
            names = ["circle", "square", "triangle"]
            build_imagefolder(folders[split], list(images), [f"a {names[y]}" for y in labels], labels=labels.tolist())
    return {"data.path": str(folders["train"]), "data.eval_path": str(folders["held_out"]), "data.channels": 3,
            "data.num_classes": 3}


DATA_SETS = {"digits": lambda cache_dir: {}, "shapes": shapes_overrides}


def prepare(cfg: Config) -> Any:
    """Data, classifier and teacher, as the demo prepares them (cached under cache_dir)."""
    family = resolve(cfg)
    return family.prepare(cfg, family.preflight(cfg))


def batches(inputs: Any, batch_size: int, seed: int):
    images, labels = inputs.train
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = torch.from_numpy(labels).long()
    g = torch.Generator().manual_seed(seed)
    while True:  # epochs of shuffled batches, as Ray Data feeds the workers
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            yield Batch(x[idx], y[idx])


class WithPowerEMAs:
    """Exploration (`--power-ema`): the run's EMAs plus one power-function average per gamma
    (`GeneratorEMA` with that train.ema_power and no cap reached), all updated after each
    generator update, so one run's weights are averaged both ways."""

    def __init__(self, ema: GeneratorEMA | None, generator: torch.nn.Module, gammas: list[float]):
        self.ema = ema
        self.power = {g: GeneratorEMA(generator, [0.9999], power=g) for g in gammas}

    def update(self) -> None:
        for ema in [self.ema, *self.power.values()]:
            if ema is not None:
                ema.update()


POWER_GAMMAS: list[float] = []  # --power-ema


def train(cfg: Config, inputs: Any, init: dict[str, Any] | None = None) -> dict[str, Any]:
    """One plain-process DMD2 run; returns the players (for a next stage) and the loop's log."""
    torch.manual_seed(cfg.train.seed)
    teacher, generator, critic = build_players(cfg, resolve(cfg), inputs.teacher_path, torch.device("cpu"))
    if init is not None:  # a second stage starts from the first's generator, critic and EMA
        generator.load_state_dict(init["generator"].state_dict() if cfg.train.init_ema is None
                                  else init["ema"].full_state_dict(cfg.train.init_ema))
        critic.load_state_dict(init["critic"].state_dict())
    ema = GeneratorEMA(generator, cfg.train.ema_decays, cfg.train.ema_power) if cfg.train.ema_decays else None
    if ema is not None and init is not None and init.get("ema") is not None:
        ema.load_state_dict(init["ema"].state_dict(), strict=False)
    step = DMD2Step(cfg, teacher, TorchOptimizedModule(generator, cfg.train, role="generator"),
                    TorchOptimizedModule(critic, cfg.train, role="critic"),
                    ema=WithPowerEMAs(ema, generator, POWER_GAMMAS),
                    regression_pairs=resolve(cfg).regression_pairs(cfg, teacher, "cpu"))
    result = train_loop(step, batches(inputs, cfg.train.batch_size, cfg.train.seed), cfg.train.max_steps,
                        log_every=cfg.train.log_every, progress=sys.stderr.isatty())
    logged = [m | {"step": i} for i, m in enumerate(result.history) if i % cfg.train.log_every == 0]
    return {"generator": generator, "critic": critic, "ema": ema, "power_emas": step.ema.power,
            "seconds": result.seconds, "log": logged,
            "nonfinite_steps": result.nonfinite_steps}


def evaluate(cfg: Config, inputs: Any, images: np.ndarray) -> dict[str, float]:
    real = inputs.held_out[0]
    spec = eval_spec(cfg)
    fid, kid = compute_fid_kid(images, real, inputs.classifier)
    quality = sample_quality_of("x", real, images, None, spec["seed"])
    # The variety figures beside FID (issue 34): each lever is judged on both.
    variety = {k.removesuffix("_x"): v for k, v in quality.items()
               if k.removesuffix("_x") in VARIETY_FIGURES}
    return {"fid": fid, "kid": kid, "class_accuracy": class_accuracy(inputs.classifier, images, spec["labels"]),
            **variety}


def teacher_figures(cfg: Config, inputs: Any) -> dict[str, float]:
    """The teacher at eval.teacher_steps with the evaluation's seed (cached: ~2 min of sampling)."""
    spec = eval_spec(cfg)
    key = f"v2-{Path(inputs.teacher_path).name}-{cfg.eval.num_samples}-{cfg.eval.teacher_steps}-{spec['seed']}"
    cache = Path(cfg.cache_dir).expanduser() / "bench" / f"teacher-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    teacher = load_unet(inputs.teacher_path)
    images = generate(lambda z, y: teacher_sample(teacher, z, cfg.eval.teacher_steps, y, cfg.loss.guidance_scale),
                      spec["labels"], spec["shape"], spec["seed"], desc="teacher")
    figures = evaluate(cfg, inputs, images)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(figures))
    return figures


def student_figures(cfg: Config, inputs: Any, trained: dict[str, Any], grids: Path | None = None) -> dict[str, dict[str, float]]:
    """Figures of the raw generator and of each EMA; with `grids`, a sample grid of each
    (5 per class) saved as `<grids>-<weights>.png`."""
    spec = eval_spec(cfg)
    out = {}

    def figures(model, name: str) -> dict[str, float]:
        model.eval()
        images = sample_student(model, spec["timesteps"], spec["labels"], spec["shape"], spec["seed"], desc="student")
        model.train()
        if grids is not None:
            first = first_per_class(spec["labels"], 5)
            save_grid(images[first], spec["labels"][first], f"{grids}-{name}.png",
                      title=f"{grids.name} ({name}, {len(cfg.generator.timesteps)} step)")
        return evaluate(cfg, inputs, images)

    out["raw"] = figures(trained["generator"], "raw")
    ema = trained["ema"]
    for decay in ema.decays if ema is not None else []:
        with ema.swapped_in(decay) as model:
            out[ema_name(decay)] = figures(model, ema_name(decay))
    for gamma, power_ema in trained["power_emas"].items():
        with power_ema.swapped_in(0.9999) as model:
            out[f"power_{gamma:g}"] = figures(model, f"power_{gamma:g}")
    return out


def run(overrides: dict[str, Any], seed: int, inputs_cache: dict, stages: list[dict[str, Any]] | None = None, evaluate_stages: bool = False,
        grids: Path | None = None) -> dict[str, Any]:
    """One run of a variant (one or more stages, each with its own overrides) at one seed.
    With `evaluate_stages`, every stage before the last is evaluated too (`stage_students`);
    with `grids`, each evaluation saves sample grids named from it (`student_figures`)."""
    stages = stages or [{}]
    trained, seconds, log, stage_students, first = None, 0.0, [], [], None
    for i, stage in enumerate(stages):
        cfg = load_config(CONFIG, {**overrides, **stage, "train.seed": seed})
        first = cfg if i == 0 else first
        key = (cfg.train.seed, cfg.model.teacher)
        if key not in inputs_cache:  # prepared once per seed and teacher: setdefault would prepare every time
            inputs_cache[key] = prepare(cfg)
        inputs = inputs_cache[key]
        trained = train(cfg, inputs, init=trained)
        seconds += trained["seconds"]
        log += [m | {"stage": i} for m in trained["log"]]
        if evaluate_stages and i + 1 < len(stages):
            stage_grids = grids.with_name(f"{grids.name}-stage{i}") if grids is not None else None
            stage_students.append(student_figures(cfg, inputs, trained, stage_grids))
    # A last stage with other timesteps (e.g. 4 steps after 1) is also evaluated at the first
    # stage's: whether training the new steps kept or undid what the shared weights did there.
    at_first_steps = (student_figures(first, inputs, trained)
                      if list(first.generator.timesteps) != list(cfg.generator.timesteps) else None)
    return {"seed": seed, "train_seconds": seconds, "teacher": teacher_figures(cfg, inputs),
            "student": student_figures(cfg, inputs, trained, grids), "stage_students": stage_students,
            "student_at_first_stage_steps": at_first_steps,
            "nonfinite_steps": trained["nonfinite_steps"], "log": log,
            "config": {k: v for k, v in cfg.flat().items() if k.startswith(("train.", "loss.", "generator."))}}


def late_means(log: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each logged figure over the second half of a run (losses, gradient norms, ...)."""
    late = log[len(log) // 2:]
    keys = sorted({k for m in late for k in m if k not in ("step", "stage")})
    return {k: statistics.fmean(m[k] for m in late if k in m) for k in keys}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread (half the range; with two seeds, |a - b| / 2) of each figure over seeds."""
    out: dict[str, Any] = {}
    for who in ["teacher"] + [f"student.{w}" for w in runs[0]["student"]]:
        rows = [r["teacher"] if who == "teacher" else r["student"][who.split(".", 1)[1]] for r in runs]
        out[who] = {k: {"mean": statistics.fmean(r[k] for r in rows),
                        "spread": (max(r[k] for r in rows) - min(r[k] for r in rows)) / 2,
                        "values": [r[k] for r in rows]} for k in rows[0]}
    return out


def table(results: dict[str, Any]) -> str:
    lines = ["| variant | what | weights | FID | KID x1e3 | class acc | recall (pixels) | teacher FID | s/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in results["variants"].items():
        s = entry["summary"]
        for who in [w for w in s if w.startswith("student.")]:
            f = s[who]
            lines.append(
                f"| {name} | {entry['what']} | {who.split('.', 1)[1]} | {f['fid']['mean']:.2f} ± {f['fid']['spread']:.2f} "
                f"| {1e3 * f['kid']['mean']:.2f} ± {1e3 * f['kid']['spread']:.2f} | {f['class_accuracy']['mean']:.3f} "
                f"| {f['recall_pixels']['mean']:.2f} | {s['teacher']['fid']['mean']:.2f} ± {s['teacher']['fid']['spread']:.2f} "
                f"| {statistics.fmean(r['train_seconds'] for r in entry['runs']):.0f} |")
    seeds = sorted({r["seed"] for e in results["variants"].values() for r in e["runs"]})
    lines.append(f"\nmean ± half-range over seeds {seeds}; {results['device']}; "
                 f"`python bench/digits_ablations.py --steps {results['max_steps']}`.")
    return "\n".join(lines)


# Staged runs, each stage from the previous one's generator, critic and EMA.
# two_stage (the paper's best ImageNet result): half the iterations without the GAN at the base
# LR, then the other half from there with the GAN on at 1/4 of it.
# four_step_*_staged: the 1-step defaults, then the 4-step recipe of docs/families.md ("Stages"): a
# step-conditioned critic at 4x the base LR, the generator from stage 1's EMA at 1/5 of it, twice
# the iterations. A 4-step student trained from the teacher at the full LR stays far behind 1
# step, and with a shared critic a 4-step stage wrecks a good 1-step student: the first step's
# output drifts off while the later steps train (bench/README.md, "A step-conditioned critic").
STAGED = {"two_stage": "stage 1 no GAN, then GAN at 1/4 LR (same total iterations)",
          "four_step_backsim_staged": "1-step defaults, then the docs' 4-step recipe with backward simulation",
          "four_step_noised_real_staged": "1-step defaults, then the docs' 4-step recipe on noised real inputs"}
FOUR_STEP_RECIPE = {"generator.timesteps": [999, 249, 99, 49], "loss.step_conditioned_critic": True,
                    "train.init_ema": 0.97}


def staged_stages(name: str, cfg_lr: float, steps: int) -> list[dict[str, Any]]:
    if name == "two_stage":
        half = steps // 2
        return [{**NO_GAN, "train.max_steps": half}, {"train.max_steps": steps - half, "train.lr": cfg_lr / 4,
                                                      "train.warmup_steps": 0}]
    backsim = name == "four_step_backsim_staged"
    return [{"train.max_steps": steps}, {**FOUR_STEP_RECIPE, "generator.backward_simulation": backsim,
                                         "train.max_steps": 2 * steps, "train.lr": cfg_lr / 5,
                                         "train.critic_lr": cfg_lr * 4, "train.warmup_steps": 0}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS + ["two_stage"],
                    help=f"from {sorted(VARIANTS) + sorted(STAGED)}")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=None, help="iterations per run (default: digits.yaml's)")
    ap.add_argument("--power-ema", nargs="*", type=float, default=[],
                    help="also evaluate EDM2 power-function EMAs with these gammas (exploration)")
    ap.add_argument("--explore", nargs="*", default=None, help="one ad-hoc run: dotted key=value overrides")
    ap.add_argument("--then", nargs="*", default=None,
                    help="with --explore: a second stage from the first's players, with these overrides on top")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--data", choices=sorted(DATA_SETS), default="digits",
                    help="digits, or shapes: coloured shapes built here and read as an image folder")
    args = ap.parse_args()
    POWER_GAMMAS.extend(args.power_ema)
    torch.set_num_threads(args.threads)
    GRIDS.mkdir(parents=True, exist_ok=True)
    base = load_config(CONFIG)
    steps = args.steps or base.train.max_steps
    inputs_cache: dict = {}
    if args.explore is not None:
        from dmdscale.config import parse_override

        data = DATA_SETS[args.data](base.cache_dir)
        overrides = data | dict(map(parse_override, args.explore)) | {"train.max_steps": steps}
        then = dict(map(parse_override, args.then)) if args.then is not None else None
        stages = [{}, then] if then is not None else None
        for seed in args.seeds:
            t0 = time.perf_counter()
            # The process id too: runs started in parallel in the same second keep their own grids.
            grids = GRIDS / f"explore-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-s{seed}"
            r = run(overrides, seed, inputs_cache, stages, evaluate_stages=True, grids=grids)
            line = {"data": args.data, "overrides": {k: v for k, v in overrides.items() if k not in data},
                    "then": then, "seed": seed, "seconds": time.perf_counter() - t0,
                    "grids": str(grids.relative_to(ROOT)),
                    **{k: r[k] for k in ("teacher", "student", "stage_students", "student_at_first_stage_steps",
                                         "train_seconds")},
                    "late_log": late_means(r["log"])}
            with open(RESULTS / "digits_explore.jsonl", "a") as f:
                f.write(json.dumps(line) + "\n")
            print(json.dumps(line, indent=1))
        return
    path = RESULTS / "digits_ablations.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if results.get("max_steps") != steps:
        results = {}
    results |= {"bench": "digits_ablations", "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
                "torch": torch.__version__, "max_steps": steps, "config": str(CONFIG.relative_to(ROOT))}
    results.setdefault("variants", {})
    for name in args.variants:
        if name in STAGED:
            what = STAGED[name]
            stages = staged_stages(name, base.train.lr, steps)
            overrides = {}
        else:
            overrides, what = VARIANTS[name]
            overrides = {**overrides, "train.max_steps": steps}
            stages = None
        runs = [run(overrides, seed, inputs_cache, stages, evaluate_stages=stages is not None)
                for seed in args.seeds]
        results["variants"][name] = {"what": what, "overrides": overrides, "stages": stages,
                                     "runs": runs, "summary": summarise(runs)}
        path.write_text(json.dumps(results, indent=1, default=str))
        print(f"{name}: " + json.dumps({k: v["fid"]["mean"] for k, v in results["variants"][name]["summary"].items()}))
    update_readme_table("digits_ablations", table(results))


if __name__ == "__main__":
    main()
