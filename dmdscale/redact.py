"""Hide credentials in text before it is logged, tracked or written to the run journal.

`redact` masks what URIs carry: the password in `scheme://user:password@host` (a lone
`scheme://token@host` is masked whole) and query parameters whose names look secret
(`?token=...`, `&X-Amz-Signature=...`). It works on whole messages, so an exception text that
quotes a tracking URI can go through it as is. `redact_mapping` does the same for a mapping's
string values and masks every string under a key that itself looks secret (`HF_TOKEN`).

`scrub` is the one way anything dmdscale writes out goes through: the run folder (metrics.json,
trained.json, the journal), MLflow params and printed figures take `scrub(value)`, credentials
masked; what is published, the exported student's folder (model card, dmdscale.json, the
diffusers configs), takes `scrub(value, public=True)`, which also names every local absolute path
by its own last part (`public_text`) and a Hub cache snapshot by its hub id, so nothing in it tells
the machine or the account it was made on.
"""
from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

MASK = "***"

# Names of query parameters and mapping keys whose values are secrets (matched lower-cased).
# Whole-token matches for short words, so `tokenizer` and `monkey` keep their values.
_SECRET_NAME = re.compile(
    r"password|passwd|secret|credential|signature|token$"
    r"|(^|[-_.])(pass|pwd|sig)$"
    r"|(^|[-_.]|api|access|private|account|sas)key$"
    r"|^auth(orization)?$|^x-amz-|^x-goog-(signature|credential)"
)

# scheme://userinfo@ : the userinfo stops at the first /, ?, # or whitespace; '@' inside it
# (an unescaped one in a password) stays part of it, the last '@' ends it.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]+)@")

# ?name=value, &name=value or ;name=value; the value runs to the next separator or space.
_PARAM = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&#?;\s]+)=(?P<value>[^&#;\s]*)")

# Punctuation that ends a sentence rather than a value: "...?token=abc: refused".
_TRAILING = ".,:;)]}'\""


def looks_secret(name: str) -> bool:
    """Whether a parameter or key name (`access_key`, `X-Amz-Credential`, `HF_TOKEN`) names a secret."""
    return _SECRET_NAME.search(name.lower()) is not None


def _mask_userinfo(m: re.Match[str]) -> str:
    user, sep, _ = m["userinfo"].partition(":")
    return f"{m['scheme']}{user}:{MASK}@" if sep else f"{m['scheme']}{MASK}@"


def _mask_param(m: re.Match[str]) -> str:
    if not looks_secret(m["name"]) or not m["value"]:
        return m[0]
    value = m["value"]
    tail = value[len(value.rstrip(_TRAILING)):]
    return f"{m['lead']}{m['name']}={MASK}{tail}"


def redact(text: str) -> str:
    """`text` with URI passwords, URI tokens and secret-looking query values replaced by ***;
    everything else, plain text and credential-free URIs included, is returned unchanged."""
    return _PARAM.sub(_mask_param, _USERINFO.sub(_mask_userinfo, text))


def redact_mapping(d: dict[Any, Any]) -> dict[Any, Any]:
    """A copy of `d` whose string values went through `redact`, nested dicts and lists included;
    a string under a secret-looking key (`password`, `MLFLOW_TRACKING_TOKEN`) becomes *** whole."""
    return scrub(d)


# A local absolute path in text: /a/b, ~/a/b, C:\\a\\b, or a URI without a host (file:///a/b,
# sqlite:////a/b.db). Not the path of a URI with a host (https://h/a/b, s3://bucket/a) nor a
# relative one (a/b, 1/2): the character before it must not be part of a word, path or URI
# (nor '<', as in the tag-like `</w>`).
_LOCAL_PATH = re.compile(
    r"(?<![\w.:/\\~%@+<-])"
    r"(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*:///?(?=/))|~(?=/))?"
    r"(?P<path>/[^\s'\"`?#()\[\]{}<>|;*]+|(?<![A-Za-z])[A-Za-z]:\\[^\s'\"`?#()\[\]{}<>|;*]+)"
)
# A snapshot in the Hub's cache (~/.cache/huggingface/hub/models--owner--name/snapshots/<rev>/...).
_HUB_SNAPSHOT = re.compile(r"(?:^|/)(?:models|datasets|spaces)--(?P<repo>[^/]+)/snapshots/[^/]+(?P<rest>/.*)?$")


def _local_name(path: str) -> str:
    """What may be published of a local absolute path: the hub id of a Hub cache snapshot (and
    what lies under it), else the path's own last part."""
    if "\\" in path:
        return PureWindowsPath(path).name or path
    path = path.rstrip("/") or path
    hub = _HUB_SNAPSHOT.search(path)
    if hub:
        return hub["repo"].replace("--", "/") + (hub["rest"] or "")
    return PurePosixPath(path).name or path


def _public_path(m: re.Match[str]) -> str:
    path = m["path"]
    tail = path[len(path.rstrip(_TRAILING)):]  # "... in /a/teacher." keeps its full stop
    return _local_name(path[:len(path) - len(tail)]) + tail


def public_text(text: str) -> str:
    """`redact(text)` with every local absolute path in it (`/home/alice/runs/x`, `~/data/y.parquet`,
    `file:///srv/ckpt`) named by its own last part (`x`, `y.parquet`, `ckpt`), a Hub cache snapshot
    by its hub id: what may go into a folder that is published. URIs with a host (`s3://bucket/a`,
    `https://h/a`), hub ids and relative paths are kept."""
    return _LOCAL_PATH.sub(_public_path, redact(text))


def _is_hub_id(s: str) -> bool:
    parts = s.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not s.startswith((".", "~")) and not os.path.exists(s)


def public_name(path_or_hub_id: str | os.PathLike[str]) -> str:
    """How a published card names a model given as a local folder or a hub id: a hub id as is;
    a Hub cache snapshot as its hub id; any other folder by its own name (`/home/alice/sdxl` ->
    `sdxl`), never by where it lies. Credentials in it are masked."""
    s = redact(os.fspath(path_or_hub_id))
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", s):  # a URI: a remote one is kept, file:///a/b named b
        return public_text(s)
    if _is_hub_id(s):
        return s
    return _local_name(str(Path(s).expanduser().resolve()))


def scrub(value: Any, *, public: bool = False) -> Any:
    """What of `value` may be written out: a copy whose strings went through `redact` (with
    `public`: `public_text`), nested dicts, lists and tuples included; a string under a
    secret-looking key (`password`, `MLFLOW_TRACKING_TOKEN`) becomes *** whole. Paths count as
    strings. Everything dmdscale writes, prints or tracks goes through here (see the module doc)."""
    text = public_text if public else redact

    def clean(v: Any, key: Any = None) -> Any:
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if isinstance(v, str):
            return MASK if key is not None and looks_secret(str(key)) else text(v)
        if isinstance(v, dict):
            return {k: clean(x, k) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(clean(x) for x in v)
        return v

    return clean(value)
