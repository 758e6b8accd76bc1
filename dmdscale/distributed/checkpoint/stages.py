"""Stages and init weights: what a next run starts from (train.init).

A finished run writes its stage/ folder (generator, critic and EMA weights, `save_stage`); a
later run's train.init points at it, or at an exported student, and is checked on the driver
before any cluster work (`check_init`, `check_init_fits`), then loaded by the workers
(`load_stage`).
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from dmdscale.config import ConfigError
from dmdscale.core.ema import ema_name


STAGE_DIR = "stage"  # in the final checkpoint and the run folder
STAGE_PARTS = ("generator", "critic", "ema")
_FAMILY_KEY = "dmdscale_family"  # a stage file's safetensors metadata: the family that wrote it
# Where each family's generator keeps its network, by the teacher folder's subfolder: the
# generator's weights are "<subfolder>.<the teacher's weight name>" (LoRA layers aside).
_NETWORK_FOLDERS = ("unet", "transformer")


def save_stage(folder: str | Path, weights: dict[str, dict[str, Tensor] | None], family: str | None = None) -> Path:
    """folder/stage/<part>.safetensors for the parts given (generator: the raw trained weights;
    critic: fake score + head; ema: the averages): a later run's `train.init`. `family`
    (model.family) is recorded in each file's metadata, so that a run of another family refuses it."""
    stage = Path(folder) / STAGE_DIR
    stage.mkdir(parents=True, exist_ok=True)
    metadata = {_FAMILY_KEY: family} if family else None
    for part, state in weights.items():
        if state is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, stage / f"{part}.safetensors",
                      metadata=metadata)
    return stage


def init_source(path: str | Path) -> tuple[str, Path]:
    """What `train.init` points at: ("stage", folder) for a run folder or its stage/ folder,
    ("student", folder) for an exported student (generator weights only). A clear error
    naming the key otherwise: checked on the driver before any cluster work."""
    from dmdscale.export import STUDENT_DIR, STUDENT_INFO

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"train.init: {folder} is not a folder (give a run folder or an exported student)")
    for candidate in (folder, folder / STAGE_DIR):
        if (candidate / "generator.safetensors").is_file():
            return "stage", candidate
    for candidate in (folder, folder / STUDENT_DIR):
        if (candidate / STUDENT_INFO).is_file():
            return "student", candidate
    raise ConfigError(f"train.init: {folder} holds neither a stage/ (written by every finished run) nor an "
                      f"exported student ({STUDENT_INFO})")


def _student_weights(folder: Path) -> Path:
    return folder / "unet" / "diffusion_pytorch_model.safetensors"


def _init_files(kind: str, folder: Path) -> list[Path]:
    """The weight files a run reads of train.init's `folder`."""
    if kind == "student":
        return [_student_weights(folder)]
    return [folder / f"{part}.safetensors" for part in STAGE_PARTS if (folder / f"{part}.safetensors").is_file()]


def _shapes(file: Path, key: str = "train.init") -> tuple[dict[str, list[int]], dict[str, str]]:
    """(tensor name -> shape, metadata) of a safetensors file, from its header only. safe_open
    checks that the header's offsets cover the file exactly, so a truncated (or extended) file
    is a ConfigError naming `key` and the file, not a failure when it is loaded."""
    try:
        with safe_open(str(file), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors' SafetensorError (not importable by a stable name), OSError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{key}: {file} is damaged or cut short ({reason}); copy it again from the run it "
                          f"came from, or start from another run") from None


def _check_family(kind: str, folder: Path, family: str) -> None:
    """An exported student's dmdscale.json and a stage's file metadata name the family that
    wrote them: another family's weights are refused here, not when a worker loads them."""
    from dmdscale.export import STUDENT_INFO

    if kind == "student":
        info = folder / STUDENT_INFO
        try:
            theirs = json.loads(info.read_text()).get("family")
        except (ValueError, AttributeError) as exc:
            raise ConfigError(f"train.init: {info} is unreadable ({type(exc).__name__}: {exc})") from None
        where = info
    else:
        theirs = _shapes(folder / "generator.safetensors")[1].get(_FAMILY_KEY)  # stages written before: unrecorded
        where = folder / "generator.safetensors"
    if theirs is not None and theirs != family:
        raise ConfigError(f"train.init: {folder} holds a {theirs} {'student' if kind == 'student' else 'stage'} "
                          f"({where.name} says so), but this run distils a {family} teacher (model.family); "
                          f"start from a {family} run")


def check_init(path: str | Path | None, generator_ema: float | None = None,
               family: str | None = None) -> tuple[str, Path] | None:
    """train.init (and train.init_ema, the EMA the generator starts from) checked on the driver
    before any cluster work, with a clear error naming the key; returns `init_source(path)`.
    Every weight file's header is read (a truncated file fails here), and with `family`
    (model.family) a student or stage of another family is refused. How its generator weights
    fit the teacher is `check_init_fits` (it needs the teacher's folder)."""
    if path is None:
        if generator_ema is not None:
            raise ConfigError("train.init_ema: set it only with train.init (the run whose EMA the generator starts from)")
        return None
    kind, folder = init_source(path)
    if kind == "student" and not _student_weights(folder).is_file():
        raise ConfigError(f"train.init: {folder} has no unet/diffusion_pytorch_model.safetensors; start from "
                          f"the run folder instead (its stage/ holds the generator, critic and EMA)")
    for file in _init_files(kind, folder):
        _shapes(file)
    if family is not None:
        _check_family(kind, folder, family)
    if generator_ema is None:
        return kind, folder
    if kind == "student":
        raise ConfigError(f"train.init_ema: {folder} is an exported student (one set of weights, no EMAs); "
                          f"give its run folder, or set train.init_ema to null")
    ema = folder / "ema.safetensors"
    names = set()
    if ema.is_file():
        with safe_open(str(ema), "pt") as f:
            names = {k.split("/", 1)[0] for k in f.keys() if "/" in k}
    if ema_name(generator_ema) not in names:
        raise ConfigError(f"train.init_ema: {folder} has no {ema_name(generator_ema)} (has: {sorted(names) or 'no EMAs'})")
    return kind, folder


def load_stage(path: str | Path, parts: tuple[str, ...] = STAGE_PARTS,
               generator_ema: float | None = None) -> dict[str, dict[str, Tensor]]:
    """The weights `train.init` starts from, by part (of `parts`: generator, and critic and ema
    when the source has them). An exported student's UNet is read as the generator's `unet.`
    weights. With `generator_ema` (train.init_ema), the generator's trained parameters are that
    EMA's averages (its buffers and frozen weights stay the raw generator's)."""
    kind, folder = check_init(path, generator_ema)
    if kind == "student":
        if "generator" not in parts:
            return {}
        return {"generator": {f"unet.{k}": v for k, v in load_file(_student_weights(folder)).items()}}
    out = {part: load_file(folder / f"{part}.safetensors") for part in parts
           if (folder / f"{part}.safetensors").is_file()}
    if generator_ema is not None and "generator" in out:
        prefix = f"{ema_name(generator_ema)}/"
        with safe_open(str(folder / "ema.safetensors"), "pt") as f:  # this decay's tensors only
            averages = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        out["generator"] = {k: averages.get(k, v).to(v.dtype) for k, v in out["generator"].items()}
    return out


def _network_shapes(folder: Path) -> dict[str, list[int]] | None:
    """The weight names and shapes of a diffusers model folder (one safetensors file or a
    sharded index), from the headers; None when it has neither or they cannot be read here."""
    single = folder / "diffusion_pytorch_model.safetensors"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"  # sharded weights
    try:
        if single.is_file():
            return _shapes(single, "model.teacher")[0]
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in _shapes(folder / shard, "model.teacher")[0].items()}
    except (ConfigError, ValueError, KeyError, TypeError, AttributeError):  # the teacher's own checks name it
        return None
    return None


def check_init_fits(path: str | Path | None, teacher: str | Path) -> bool:
    """train.init's generator weights against this run's teacher (a local diffusers folder):
    the generator starts as a copy of the teacher, so every teacher weight must be there, under
    the generator's name, with the teacher's shape, and no other network weight. A ConfigError
    naming train.init, the file and the first differences; checked on the driver before any
    training. False when the teacher's weights cannot be read here (a hub id, not yet trained)."""
    if path is None:
        return True
    teacher_folder = Path(str(teacher)).expanduser()
    if not str(teacher) or not teacher_folder.is_dir():
        return False
    kind, folder = init_source(path)
    file = _init_files(kind, folder)[0] if kind == "student" else folder / "generator.safetensors"
    generator = _shapes(file)[0]
    if kind == "student":  # load_stage reads a student's UNet as the generator's unet.* weights
        generator = {f"unet.{k}": v for k, v in generator.items()}
    checked = False
    for sub in _NETWORK_FOLDERS:
        expected = _network_shapes(teacher_folder / sub)
        if expected is None:
            continue
        checked = True
        prefix = f"{sub}."
        # LoRA layers: the adapter's own weights are new, the wrapped layer's are the teacher's.
        have = {k[len(prefix):].replace(".base_layer.", "."): v for k, v in generator.items()
                if k.startswith(prefix) and "lora_" not in k}
        missing = sorted(set(expected) - set(have))
        extra = sorted(set(have) - set(expected))
        other = sorted(k for k in set(expected) & set(have) if list(expected[k]) != list(have[k]))
        if missing or extra or other:
            problems = []
            if missing:
                problems.append(f"{len(missing)} of the teacher's {sub} weights missing (e.g. {prefix}{missing[0]})")
            if extra:
                problems.append(f"{len(extra)} weights the teacher's {sub} lacks (e.g. {prefix}{extra[0]})")
            if other:
                problems.append(f"{len(other)} of other shapes (e.g. {prefix}{other[0]}: {have[other[0]]} against "
                                f"the teacher's {expected[other[0]]})")
            raise ConfigError(f"train.init: {file} does not fit this run's generator, a copy of the teacher "
                              f"{teacher_folder} ({'; '.join(problems)}); start from a run (or student) of this "
                              f"teacher")
    return checked
