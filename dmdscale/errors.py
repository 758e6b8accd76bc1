"""Expected failures: what a user can fix (a config value, a data file, a teacher folder, the
tracking server, the cluster's size). The command line prints their one-line message and exits
non-zero; anything else is a bug and keeps its traceback (as do these with --debug)."""
from __future__ import annotations


class UserError(Exception):
    """An expected failure whose message says what is wrong and what to do."""


class TeacherNotFound(UserError, FileNotFoundError):
    """model.teacher is not a loadable teacher: a folder lacking parts, or an unreachable hub id."""


class EvaluationError(UserError, ValueError):
    """A bad argument or input file of the evaluation command (`python -m dmdscale.evaluate`);
    the message names it."""


def warn(message: str) -> None:
    """One warning line on stderr, credentials in URIs masked. print, not warnings.warn: the
    default filter would show a repeated warning (a later outage's) only once."""
    import sys

    from dmdscale.redact import redact

    print(f"warning: {redact(message)}", file=sys.stderr, flush=True)


def user_error_in(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`, if any: itself, its cause or context chain, or (Ray wraps
    errors raised on workers and actors) the error a Ray exception carries."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        failures = getattr(e, "worker_failures", None)  # ray.train's WorkerGroupError: by rank
        if isinstance(failures, dict):
            todo += [v for v in failures.values() if isinstance(v, BaseException)]
    return None
