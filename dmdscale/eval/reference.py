"""The real images' reference statistics of the evaluation command: what they are keyed by
(`reference_key`, also stored in their .npz) so a changed source, resolution, extractor or
patch setting recomputes them, and no local path is written into the key."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any


def fingerprint(source: Path) -> list[int]:
    """What tells a changed real source apart under the same path: sizes and modification times."""
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    stats = [f.stat() for f in files]
    return [len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]


def path_id(path: Path) -> str:
    """A local path as the cache key and the .npz hold it: its name and a hash of where it
    resolves to (one cache entry per location, but no local path, nor account name, in the file)."""
    return f"{path.name}@{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"


def fid_extractor_id(fid_features: str, clip_model: str | os.PathLike | None) -> str:
    """What the reference statistics record as their feature extractor: "inception", or
    "clip:" and the CLIP model (a local folder as `path_id`, a hub id as it is)."""
    if fid_features == "inception":
        return "inception"
    folder = Path(clip_model).expanduser()
    return f"clip:{path_id(folder) if folder.is_dir() else clip_model}"


def reference_key(real: Path, resolution: int, extractor: str, patch_size: int | None,
                  num_real: int | None) -> dict[str, Any]:
    """The reference statistics' cache key (also stored in their .npz): what changes the figures."""
    return {"source": path_id(real), "fingerprint": fingerprint(real), "resolution": resolution,
            "extractor": extractor, "patch_size": patch_size, "num_real": num_real}
