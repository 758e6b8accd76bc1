"""Peak host memory of building a train worker's players, by build order and teacher placement.

Two ranks (one process each, gloo on CPU, ZeRO-3) build the SD1.5-architecture players from one
random-weight pipeline whose UNet is widened to --width channels (a tiny pipeline is all
interpreter and libraries), each set-up in fresh processes:

- copies first: `build_players` without engines (teacher + generator + fake score, three full
  copies), then the two DeepSpeed engines; the train worker's order before the lean start-up;
- lean: `build_engines`, each copy wrapped (and under ZeRO-3 partitioned) as soon as it is made;
- lean + sharded teacher: the same with scale.shard_teacher.

Per rank, in units of one full fp32 copy of the UNet: the full copies alive (the storage of all
parameters, each storage once, found through the garbage collector; a partitioned parameter's
is empty) at marks where a copy has just been made, after each engine and once the players are
built; the resident set once built; and ru_maxrss (the process's peak resident set); both over
the resident set just before building (libraries loaded, process group up). On CPU the engines' ZeRO-3 optimizer states (fp32 master partition, gradient
partition, two AdamW moments: ~2 copies per engine at 2 ranks) share the host with the weights,
so they set the resident peak; on a GPU they sit on the device and the host holds the weights.

    python bench/startup_memory.py [--width 320]

Writes bench/results/startup_memory.json and rewrites its table in bench/README.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from readme_table import update_readme_table
from dmdscale.families import resolve

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
SETUPS = {"copies_first": {"lean": False, "shard_teacher": False},
          "lean": {"lean": True, "shard_teacher": False},
          "lean_sharded_teacher": {"lean": True, "shard_teacher": True}}


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def build_pipeline(folder: Path, width: int) -> Path:
    """The tiny sd15 pipeline with its UNet widened to (width, 2 width) channels."""
    from diffusers import UNet2DConditionModel

    from dmdscale.families.sd.tiny import build_tiny_pipeline, tiny_unet_config

    path = build_tiny_pipeline("sd15", folder)
    torch.manual_seed(0)
    config = tiny_unet_config("sd15") | {"block_out_channels": (width, 2 * width), "attention_head_dim": 8,
                                         "norm_num_groups": 32}
    UNet2DConditionModel(**config).save_pretrained(path / "unet")
    return path


def full_parameters_mib() -> float:
    """The storage of every parameter alive on this rank, each storage once: the full copies
    (a parameter ZeRO-3 has partitioned keeps an empty tensor; its partition is not counted)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes()
                for p in gc.get_objects() if isinstance(p, torch.nn.Parameter) and p.device.type == "cpu"}
    return sum(storages.values()) / 2**20


def rank_main(rank: int, setup: str, teacher: str, port: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    import deepspeed  # noqa: F401  (loaded before the baseline, as in a worker)

    from dmdscale.config import build_config
    from dmdscale.distributed.engine import DeepSpeedOptimizedModule
    from dmdscale.distributed.worker import build_players

    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    options = SETUPS[setup]
    cfg = build_config({}, {"model.family": "sd15", "model.teacher": teacher, "data.channels": 3,
                            "data.resolution": 32, "train.batch_size": WORLD, "scale.num_workers": WORLD,
                            "scale.zero_stage": 3, "scale.shard_teacher": options["shard_teacher"]})
    cpu, micro = torch.device("cpu"), cfg.train.batch_size // WORLD
    marks: list[dict] = []

    def mark(where: str) -> None:
        marks.append({"at": where, "rss_mib": resident_mib(), "full_parameters_mib": full_parameters_mib()})

    def engine(module: torch.nn.Module, role: str) -> DeepSpeedOptimizedModule:
        """`build_engines`'s wrap, with a mark where the full copy is alive and one after."""
        mark(f"{role} copy made")
        wrapped = DeepSpeedOptimizedModule(module, cfg.train, cfg.scale, micro, role=role)
        mark(f"{role} engine built")
        return wrapped

    torch.distributed.barrier()
    baseline = resident_mib()
    if options["lean"]:  # build_engines: each copy wrapped as soon as it is made
        teacher_module, gen, critic = build_players(cfg, resolve(cfg), teacher, cpu, wrap=engine)
    else:  # the former order: three full copies, then the engines partition two of them
        teacher_module, generator, critic_module = build_players(cfg, resolve(cfg), teacher, cpu)
        gen, critic = engine(generator, "generator"), engine(critic_module, "critic")
        del generator, critic_module
    mark("players built")
    torch.distributed.barrier()
    params = sum(getattr(p, "ds_numel", p.numel()) for p in teacher_module.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in teacher_module.parameters())
    copy_mib = params * 4 / 2**20
    record = {"setup": setup, "rank": rank, "teacher_parameters": params, "teacher_elements_held": held,
              "copy_mib": copy_mib, "baseline_rss_mib": baseline, "peak_rss_mib": peak_mib(), "marks": marks}
    record["peak_rss_over_baseline_copies"] = (record["peak_rss_mib"] - baseline) / copy_mib
    record["built_rss_over_baseline_copies"] = (marks[-1]["rss_mib"] - baseline) / copy_mib
    record["max_full_copies"] = max(m["full_parameters_mib"] for m in marks) / copy_mib
    record["built_full_copies"] = marks[-1]["full_parameters_mib"] / copy_mib
    Path(out, f"{setup}_{rank}.json").write_text(json.dumps(record))
    del gen, critic
    torch.distributed.destroy_process_group()


def write_table(result: dict) -> None:
    """bench/README.md's table: per set-up, the worse of the two ranks."""
    names = {"copies_first": "copies first, then engines (the former order)", "lean": "lean (`build_engines`)",
             "lean_sharded_teacher": "lean + scale.shard_teacher"}
    lines = ["| build order | full copies at most | full copies once built | resident peak | resident once built |",
             "|---|---|---|---|---|"]
    for setup, name in names.items():
        rows = [r for r in result["rows"] if r["setup"] == setup]
        worst = {k: max(r[k] for r in rows) for k in ("max_full_copies", "built_full_copies",
                                                       "peak_rss_over_baseline_copies", "built_rss_over_baseline_copies")}
        lines.append(f"| {name} | {worst['max_full_copies']:.2f} | {worst['built_full_copies']:.2f} | "
                     f"+{worst['peak_rss_over_baseline_copies']:.2f} | +{worst['built_rss_over_baseline_copies']:.2f} |")
    copy_mib = result["rows"][0]["copy_mib"]
    update_readme_table("startup_memory", "\n".join(lines) + f"\n\nIn copies of the {copy_mib:.0f} MiB fp32 UNet "
                        f"({result['rows'][0]['teacher_parameters'] / 1e6:.0f} M parameters, width {result['width']}), "
                        f"per rank of {result['workers']}, ZeRO-{result['zero_stage']}, CPU.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=320)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = str(build_pipeline(Path(tmp) / "sd15", args.width))
        for i, setup in enumerate(SETUPS):
            mp.spawn(rank_main, args=(setup, teacher, 29600 + i, tmp), nprocs=WORLD, join=True)
            rows += [json.loads(Path(tmp, f"{setup}_{r}.json").read_text()) for r in range(WORLD)]
    result = {"workers": WORLD, "zero_stage": 3, "width": args.width, "dtype": "float32", "rows": rows}
    (ROOT / "bench" / "results" / "startup_memory.json").write_text(json.dumps(result, indent=2))
    write_table(result)
    for r in rows:
        print(f"{r['setup']:>20} rank {r['rank']}: full copies at most {r['max_full_copies']:.2f}, built "
              f"{r['built_full_copies']:.2f}; RSS over baseline: peak {r['peak_rss_over_baseline_copies']:.2f}, "
              f"built {r['built_rss_over_baseline_copies']:.2f} copies of {r['copy_mib']:.0f} MiB "
              f"(peak {r['peak_rss_mib']:.0f} MiB); teacher elements held "
              f"{r['teacher_elements_held']}/{r['teacher_parameters']}")

if __name__ == "__main__":
    main()
