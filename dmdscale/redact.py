"""Hide credentials in text before it is logged, tracked or written to the run journal.

`redact` masks what URIs carry: the password in `scheme://user:password@host` (a lone
`scheme://token@host` is masked whole) and query parameters whose names look secret
(`?token=...`, `&X-Amz-Signature=...`). It works on whole messages, so an exception text that
quotes a tracking URI can go through it as is. `redact_mapping` does the same for a mapping's
string values and masks every string under a key that itself looks secret (`HF_TOKEN`).
"""
from __future__ import annotations

import re
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
    return {k: (MASK if isinstance(v, str) and looks_secret(str(k)) else _redact_value(v)) for k, v in d.items()}


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return redact_mapping(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value(v) for v in value)
    return value
