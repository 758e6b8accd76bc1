"""Work an evaluation does not redo: arrays that depend only on a key (the teacher's evaluation
samples: its weights, sampler, steps, guidance, labels, seed and count), kept as .npz files under
`cache_dir`, and figures measured on them (the teacher's and the real data's FID, KID and sample
quality: the key adds the held-out images and the feature extractor), kept as .json files. A
second run with the same teacher reads them; any change of the key makes them anew."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 over a folder's files (relative names and bytes): the identity of a teacher's
    weights, whatever path it is read from."""
    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def module_fingerprint(module: Any) -> str:
    """sha256 over a module's state (names, shapes and bytes): a feature extractor's identity;
    a name or path (clean-fid's Inception) stands for itself."""
    if isinstance(module, (str, os.PathLike)):
        return str(module)
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def key_name(key: dict[str, Any]) -> str:
    """The file name of a key: a hash of its JSON (arrays hashed by their bytes)."""
    def plain(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return {"array_sha256": hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest(),
                    "shape": list(v.shape), "dtype": str(v.dtype)}
        return v

    text = json.dumps({k: plain(v) for k, v in key.items()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def replace_atomically(path: Path, write: Callable[[Any], Any]) -> None:
    """`write(f)` into a temporary binary file beside `path`, then renamed onto it: a reader (a
    later run, another rank writing the same key) finds the whole file or none, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # write failed: no half file left behind
            os.unlink(tmp)


def cached_arrays(folder: str | os.PathLike | None, key: dict[str, Any],
                  make: Callable[[], dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], bool]:
    """(`make()`'s arrays, whether they came from the cache). With `folder` None nothing is kept.
    A file that does not read back (a crash mid-write cannot leave one: it is renamed into place)
    is made again."""
    if folder is None:
        return make(), False
    path = Path(folder).expanduser() / f"{key_name(key)}.npz"
    if path.is_file():
        try:
            with np.load(path) as stored:
                return {k: stored[k] for k in stored.files}, True
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # damaged: drawn again
            pass
    arrays = make()
    replace_atomically(path, lambda f: np.savez(f, **arrays))
    (path.with_suffix(".json")).write_text(json.dumps({k: v for k, v in key.items() if not isinstance(v, np.ndarray)},
                                                      indent=1, default=str))
    return arrays, False


def cached_figures(folder: str | os.PathLike | None, key: dict[str, Any],
                   make: Callable[[], dict[str, float]]) -> tuple[dict[str, float], bool]:
    """(`make()`'s figures, whether they came from the cache): as `cached_arrays`, for a dict of
    numbers kept as JSON beside its key."""
    if folder is None:
        return make(), False
    path = Path(folder).expanduser() / f"{key_name(key)}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())["figures"], True
        except (OSError, ValueError, KeyError):  # damaged: measured again
            pass
    figures = make()
    record = {"key": {k: v for k, v in key.items() if not isinstance(v, np.ndarray)}, "figures": figures}
    replace_atomically(path, lambda f: f.write(json.dumps(record, indent=1, default=str).encode()))
    return figures, False
