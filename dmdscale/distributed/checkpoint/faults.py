"""Fault injection: DMDSCALE_FAIL_AT_STEP makes rank 0 fail once at that step, to rehearse
recovery."""
from __future__ import annotations

from dmdscale.config import ConfigError


class InjectedFailure(RuntimeError):
    """Raised once by rank 0 at DMDSCALE_FAIL_AT_STEP, to rehearse recovery."""


def parse_fail_at_step(value: str | None) -> int | None:
    """DMDSCALE_FAIL_AT_STEP as an int, or a clear error naming the variable."""
    if value is None or value.strip() == "":
        return None
    try:
        step = int(value)
    except ValueError:
        raise ConfigError(f"DMDSCALE_FAIL_AT_STEP must be a non-negative integer step, got {value!r}") from None
    if step < 0:
        raise ConfigError(f"DMDSCALE_FAIL_AT_STEP must be a non-negative integer step, got {value!r}")
    return step
