"""How noisy is the digits FID? One model's FID over disjoint noise draws, by sample count.

The digits FID compares `eval.num_samples` generated images with the 360 held-out digits on
the digit classifier's features. The held-out set is fixed, so what moves between draws is the
generated side: this script samples a pool from one exported student (and, with
`--teacher-pool`, from the 50-step teacher), splits it into disjoint sets of each size and
reports every set's FID, their mean and standard deviation, and the FID of the whole pool.

    python bench/eval_noise.py --student runs/demo/student --seed 0
    python bench/eval_noise.py --student runs/demo/student --teacher-pool 10000

Writes bench/results/eval_noise.json (one entry per model).
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

import numpy as np
import torch

from dmdscale.config import load_config
from dmdscale.core.sampling import teacher_sample
from dmdscale.families.unet2d.evaluator import eval_spec
from dmdscale.eval.metrics import compute_fid_kid, generate, sample_student
from dmdscale.families import resolve
from dmdscale.families.unet2d.model import load_unet

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pipelines" / "configs" / "digits.yaml"
RESULT = ROOT / "bench" / "results" / "eval_noise.json"


def spread(images: np.ndarray, real: np.ndarray, classifier, sizes: list[int]) -> dict:
    out = {"pool": len(images), "fid_pool": compute_fid_kid(images, real, classifier)[0]}
    for n in sizes:
        fids = [compute_fid_kid(images[i:i + n], real, classifier)[0] for i in range(0, len(images) - n + 1, n)]
        out[str(n)] = {"fids": fids, "mean": statistics.fmean(fids),
                       "sd": statistics.stdev(fids) if len(fids) > 1 else None}
        print(f"  {n:>6} samples: FID {' '.join(f'{f:.2f}' for f in fids)}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="an exported student folder (runs/<out>/student)")
    ap.add_argument("--seed", type=int, default=0, help="train.seed: which cached teacher and held-out split")
    ap.add_argument("--pool", type=int, default=20000, help="student samples")
    ap.add_argument("--teacher-pool", type=int, default=0, help="50-step teacher samples (0: none; ~75 s per 1000 per core)")
    ap.add_argument("--sizes", nargs="*", type=int, default=[1000, 5000])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    if not (Path(args.student) / "unet").is_dir():
        sys.exit(f"--student: {args.student} is not an exported student folder (no unet/ inside)")
    torch.set_num_threads(args.threads)
    cfg = load_config(CONFIG, {"train.seed": args.seed})
    family = resolve(cfg)
    inputs = family.prepare(cfg, family.preflight(cfg))
    spec, real = eval_spec(cfg), inputs.held_out[0]
    results = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    # A noise seed unlike the evaluation's own, so these draws are fresh ones.
    seed = spec["seed"] + 1
    student = load_unet(args.student).eval()
    print(f"student {args.student} ({args.pool} samples)", flush=True)
    images = sample_student(student, spec["timesteps"], np.arange(args.pool) % cfg.data.num_classes,
                            spec["shape"], seed, desc="student")
    entry = {"student": spread(images, real, inputs.classifier, args.sizes)}
    if args.teacher_pool:
        teacher = load_unet(inputs.teacher_path)
        start = time.perf_counter()
        images = generate(lambda z, y: teacher_sample(teacher, z, cfg.eval.teacher_steps, y, cfg.loss.guidance_scale),
                          np.arange(args.teacher_pool) % cfg.data.num_classes, spec["shape"], seed, desc="teacher")
        print(f"teacher, {cfg.eval.teacher_steps} steps ({args.teacher_pool} samples, "
              f"{time.perf_counter() - start:.0f} s)", flush=True)
        entry["teacher"] = spread(images, real, inputs.classifier, args.sizes)
    entry |= {"seed": args.seed, "held_out": len(real), "device": f"{platform.processor() or platform.machine()}, "
              f"{args.threads} threads", "command": "python " + " ".join(sys.argv)}
    results[f"{args.student} seed {args.seed}"] = entry
    RESULT.write_text(json.dumps(results, indent=1))
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
