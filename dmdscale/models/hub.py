"""Where a teacher comes from: a local folder, or a Hugging Face Hub id checked before any
cluster work."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


def is_local(p: str | os.PathLike) -> bool:
    """True when `p` must be a local folder: it exists, or it cannot be a hub id ("owner/name")."""
    s = str(p)
    if os.path.exists(s):
        return True
    parts = s.split("/")
    looks_like_hub_id = 1 <= len(parts) <= 2 and all(parts) and not s.startswith((".", "~"))
    return not looks_like_hub_id


HUB_TIMEOUT_S = 10.0  # a firewall that drops packets would otherwise hang on the hub client's timeouts


def check_hub_teacher(repo_id: str, timeout: float = HUB_TIMEOUT_S) -> None:
    """A hub-id teacher must be loadable before any cluster work: in the local cache (all an
    offline machine has), else found on the Hub within `timeout` seconds. A local path passes
    (the family checks the folder's parts)."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from dmdscale.errors import TeacherNotFound

    if is_local(repo_id):
        return
    try:
        snapshot_download(repo_id, local_files_only=True)
        return
    except LocalEntryNotFoundError:
        pass
    except Exception as exc:  # an unusable cache entry: the Hub may still serve it
        if constants.HF_HUB_OFFLINE:
            raise TeacherNotFound(f"model.teacher {repo_id!r}: its local cache entry is unusable ({exc})") from None
    if constants.HF_HUB_OFFLINE:
        raise TeacherNotFound(f"model.teacher {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                              f"is set: download it first (huggingface-cli download {repo_id}) or give a local folder")
    try:
        HfApi().model_info(repo_id, timeout=timeout)
    except Exception as exc:
        raise TeacherNotFound(f"model.teacher {repo_id!r}: the Hugging Face Hub did not serve it within {timeout:g} s "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); check the id "
                              f"and the network, or give a local pipeline folder") from None


def check_pipeline_parts(path: str | os.PathLike, family: str, components: Sequence[str]) -> str:
    """A teacher given as a local folder must hold `components` (paths inside it); a hub id passes
    through (from_pretrained resolves it). Raises TeacherNotFound naming what is missing."""
    from dmdscale.errors import TeacherNotFound

    p = os.fspath(path)
    if not is_local(p):
        return p
    root = Path(p).expanduser()
    missing = [n for n in components if not (root / n).exists()]
    if missing:
        raise TeacherNotFound(f"model.teacher {str(root)!r} is not a diffusers {family} pipeline folder: "
                              f"missing {', '.join(missing)}")
    return str(root)
