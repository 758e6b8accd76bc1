"""FID and KID of the demo's sizes: clean-fid's PNG-folder path vs dmdscale's in-memory one.

Every checkpoint evaluation and the final evaluation compute FID and KID of 1000 samples
against the 360 held-out digits (16x16 grayscale) on the digit classifier's features. clean-fid
reads PNG folders and resizes each image's channels to 299x299 with PIL; `clean_resize` does
the same resize in memory as two matrix products. This times both on the same images, in one
run, and checks that they give the same FID (the unit tests check it to float rounding).

    python bench/fid_features.py [--threads 1]

Writes bench/results/fid_features.json and the table in bench/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from readme_table import update_readme_table

from dmdscale.data.sources import build_digits_parquet, load_arrays
from dmdscale.eval import metrics as ev

RESULTS = Path(__file__).resolve().parent / "results"


def digits_16px(workdir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The demo's held-out digits, training digits and their labels at 16x16 (uint8 NHWC),
    decoded as the demo does."""
    paths = build_digits_parquet(workdir)
    ref = load_arrays(paths["test"], 16, 1)[0]
    train, labels, _ = load_arrays(paths["train"], 16, 1, require_labels=True)
    return ref, train, labels


def folder_path(gen: np.ndarray, ref: np.ndarray, clf: ev.DigitClassifier, workdir: Path) -> float:
    """What dmdscale computed before: clean-fid's own compute_fid on two PNG folders."""
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        a, b = ev.write_png_folder(gen, Path(tmp) / "gen"), ev.write_png_folder(ref, Path(tmp) / "ref")
        return float(cleanfid_fid.compute_fid(
            str(a), str(b), mode="clean", custom_feat_extractor=ev.CleanFIDFeatures(clf), device=torch.device("cpu"),
            num_workers=0, batch_size=100, verbose=False, use_dataparallel=False))


def fastest(fn, repeats: int) -> tuple[float, Any]:
    times, value = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return min(times), value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (an evaluation actor has 1)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ref, train, labels = digits_16px(Path(tmp))
        clf = ev.train_classifier(train, labels, steps=300, progress=False)  # the timing does not need more
        gen = train[np.random.default_rng(0).integers(0, len(train), 1000)]  # 1000 "samples"
        folder_s, folder_fid = fastest(lambda: folder_path(gen, ref, clf, Path(tmp)), args.repeats)
        memory_s, memory_fid = fastest(lambda: ev.compute_fid(gen, ref, clf), args.repeats)
        both_s, _ = fastest(lambda: ev.compute_fid_kid(gen, ref, clf), args.repeats)
    result = {"bench": "fid_features", "device": f"cpu ({platform.machine()}, {os.cpu_count()} cores)",
              "torch": torch.__version__, "threads": args.threads, "samples": len(gen), "reference": len(ref),
              "resolution": 16, "folder_seconds": folder_s, "in_memory_seconds": memory_s,
              "in_memory_fid_kid_seconds": both_s, "speedup": folder_s / memory_s,
              "fid_folder": folder_fid, "fid_in_memory": memory_fid,
              "fid_relative_difference": abs(memory_fid - folder_fid) / folder_fid}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fid_features.json").write_text(json.dumps(result, indent=1))
    rows = [
        "| path | seconds (fastest of %d) | FID |" % args.repeats,
        "|---|---|---|",
        f"| clean-fid `compute_fid` on PNG folders (before) | {folder_s:.2f} | {folder_fid:.4f} |",
        f"| `compute_fid` in memory (`clean_resize`) | {memory_s:.2f} | {memory_fid:.4f} |",
        f"| `compute_fid_kid` in memory | {both_s:.2f} | |",
        "",
        f"in memory / folders: **{folder_s / memory_s:.1f}x** faster; FID differs by "
        f"{result['fid_relative_difference']:.1e} (relative). {len(gen)} vs {len(ref)} images at 16 px, "
        f"{args.threads} torch thread(s); {result['device']}; `python bench/fid_features.py`.",
    ]
    update_readme_table("fid_features", "\n".join(rows))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
