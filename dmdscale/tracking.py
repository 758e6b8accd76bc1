"""MLflow tracking. The URI is MLflow's own default (sqlite:///mlflow.db in the working
directory) unless MLFLOW_TRACKING_URI says otherwise (e.g. an `mlflow server`).

Every logging call during a run goes through an `MlflowSink`, which never raises: a tracking
server that goes away mid-run costs a warning, not the run. The run folder keeps its own
copy of every figure (metrics.json, train_log.json, the pictures), so nothing is lost.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import mlflow
from mlflow.entities import Metric, Param, RunTag

from dmdscale.errors import UserError, warn
from dmdscale.redact import redact, scrub

# MLflow's HTTP client retries a failed request 7 times with backoff factor 2, each try with a
# 120 s timeout: with the server gone, one logging call blocks a training step for about 4
# minutes. dmdscale retries on its own scale instead (MlflowSink's back-off), so its default
# is a short client-side retry; a user's own setting of these variables wins.
HTTP_CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # an int for MLflow: sleeps 0 s, then 2 s
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def bound_http_retries(tracking_uri: str | None) -> None:
    """Set HTTP_CLIENT_DEFAULTS in this process for an http(s) tracking server, unless set.
    MLflow reads them at each request, so this works whenever it is called."""
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        for name, value in HTTP_CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)


def absolute_tracking_uri() -> str:
    """MLflow's URI with a relative sqlite path made absolute, so Ray workers (which run in
    another working directory) log into the same database as the driver."""
    uri = mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).absolute())
    return uri


class MlflowSink:
    """Logging calls into one MLflow run that never raise: what the driver, rank 0 of the
    train workers and the evaluation actors log through.

    A failing call prints one warning (stderr) and starts a back-off: calls within
    `retry_after` seconds are skipped rather than each paying the client's own retries, then
    the next call tries again (a further failure doubles the wait, up to `max_retry_after`,
    silently). When the server answers again, one line says so. `failures` and `skipped`
    count the calls that did not reach MLflow. Without a URI or run id the sink is disabled
    and its calls do nothing. `clock` is injectable for tests.
    """

    def __init__(self, tracking_uri: str | None, run_id: str | None, *, client: Any = None,
                 retry_after: float = 60.0, max_retry_after: float = 600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.enabled = bool(tracking_uri and run_id)
        self.failures = self.skipped = 0
        self.last_problem: str | None = None  # why the latest call did not reach MLflow
        self._first_wait, self._max_wait, self._clock = retry_after, max_retry_after, clock
        self._wait = retry_after
        self._retry_at: float | None = None  # set while failing: no call before this time
        bound_http_retries(tracking_uri)
        self._client = client
        if self.enabled and client is None:
            # Connect now, so the first call does not pay MLflow's start-up (a sqlite store
            # opens its database); if that fails, the first call tries again and reports it.
            with contextlib.suppress(Exception):
                self._client = mlflow.MlflowClient(tracking_uri)

    @property
    def failing(self) -> bool:
        return self._retry_at is not None

    def log_metrics(self, metrics: dict[str, float], step: int, what: str | None = None) -> bool:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        return self.call(what or f"metrics at step {step}",
                         lambda client: client.log_batch(self.run_id, metrics=batch))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> bool:
        return self.call(f"artifact {Path(path).name}",
                         lambda client: client.log_artifact(self.run_id, str(path), artifact_path))

    def call(self, what: str, fn: Callable[[Any], Any]) -> bool:
        """`fn(client)`; True if it reached MLflow, False if it failed or was skipped."""
        if not self.enabled:
            return True
        if self._retry_at is not None and self._clock() < self._retry_at:
            self.skipped += 1
            self.last_problem = (f"skipped: MLflow at {redact(self.tracking_uri)} failed earlier; "
                                 f"next try in {self._retry_at - self._clock():.0f} s")
            return False
        try:
            if self._client is None:
                self._client = mlflow.MlflowClient(self.tracking_uri)
            fn(self._client)
        except Exception as exc:  # tracking must never stop training or evaluation
            self._failed(what, exc)
            return False
        if self._retry_at is not None:
            self._recovered()
        return True

    def _failed(self, what: str, exc: Exception) -> None:
        self.failures += 1
        self.last_problem = redact(f"{type(exc).__name__}: {exc}")
        if self._retry_at is None:  # the first failure of an outage: say it once
            warn(f"MLflow logging to {self.tracking_uri} failed ({what}): {self.last_problem}\n"
                  f"  Training goes on; the figures are kept in the run folder. MLflow calls are "
                  f"skipped for {self._wait:.0f} s, then tried again.")
        else:
            self._wait = min(2 * self._wait, self._max_wait)
        self._retry_at = self._clock() + self._wait

    def _recovered(self) -> None:
        print(f"dmdscale: MLflow at {redact(self.tracking_uri)} answers again ({self.failures} calls failed and "
              f"{self.skipped} were skipped so far; those figures are only in the run folder)",
              file=sys.stderr, flush=True)
        self._retry_at, self._wait = None, self._first_wait


class TrackingUnavailable(UserError, RuntimeError):
    """The run could not be created or opened at the tracking URI when it started."""


def check_tracking_server(tracking_uri: str, timeout: float = 5.0) -> None:
    """Before any slow work: an http(s) tracking server must answer its /health endpoint within
    `timeout` seconds (a local sqlite or file store needs no check)."""
    import urllib.error
    import urllib.request

    if not tracking_uri.startswith(("http://", "https://")):
        return
    url = tracking_uri.rstrip("/") + "/health"
    try:  # credentials in the URI go in a header, as MLflow's client sends them
        request = urllib.request.Request(_without_userinfo(url), headers=_basic_auth(tracking_uri))
        with urllib.request.urlopen(request, timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # it answers; MLflow's own client reports credentials
            return
        problem = f"HTTP {exc.code}"
    except Exception as exc:
        problem = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
    raise TrackingUnavailable(
        f"the MLflow tracking server at {redact(tracking_uri)} did not answer within {timeout:g} s ({redact(problem)}); "
        f"start it, fix MLFLOW_TRACKING_URI, or unset it to log into ./mlflow.db")


def _without_userinfo(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))


def _basic_auth(url: str) -> dict[str, str]:
    import base64
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if parts.username is None:
        return {}
    token = base64.b64encode(f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


class Tracker:
    """One MLflow run: flattened config as params, metrics with their step, artifacts.

    Through an `MlflowClient` bound to the URI, not mlflow's process-wide fluent state, so a
    tracker leaves no tracking URI or active run behind in the process that used it. Opening
    the run must work (an unreachable URI at the start is a configuration error, raised as
    TrackingUnavailable); after that every call goes through an `MlflowSink` and never raises.
    `tags` are set on the run (e.g. a sweep trial's parent run).
    """

    def __init__(self, experiment: str, run_name: str | None = None,
                 params: dict[str, Any] | None = None, resume_run_id: str | None = None,
                 tags: dict[str, str] | None = None):
        self.tracking_uri = absolute_tracking_uri()
        bound_http_retries(self.tracking_uri)
        self.client = mlflow.MlflowClient(self.tracking_uri)
        try:
            self.run = self._open_run(experiment, run_name, resume_run_id)
            self.run_id = self.run.info.run_id
            logged = self.run.data.params  # a resumed run keeps the values it started with
            params = {k: str(v)[:6000] for k, v in scrub(params or {}).items() if k not in logged}
            if params or tags:
                self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()],
                                      tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])
        except Exception as exc:
            raise TrackingUnavailable(redact(
                f"cannot start an MLflow run at {self.tracking_uri} (MLFLOW_TRACKING_URI="
                f"{os.environ.get('MLFLOW_TRACKING_URI', '<unset>')}): {type(exc).__name__}: {exc}\n"
                f"Start the tracking server, fix MLFLOW_TRACKING_URI, or unset it to log into "
                f"./mlflow.db.")) from exc
        self.sink = MlflowSink(self.tracking_uri, self.run_id, client=self.client)

    def _open_run(self, experiment: str, run_name: str | None, resume_run_id: str | None) -> Any:
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        if resume_run_id:  # a resumed training run continues its MLflow run's curves
            try:
                self.client.update_run(resume_run_id, status="RUNNING")
                return self.client.get_run(resume_run_id)
            except mlflow.exceptions.MlflowException as exc:
                print(f"warning: cannot continue MLflow run {resume_run_id} ({exc}); starting a new one")
        return self.client.create_run(experiment_id, run_name=run_name)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.sink.log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.sink.log_artifact(path, artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.sink.call(f"ending the run as {status}", lambda client: client.set_terminated(self.run_id, status))
        if self.sink.failures or self.sink.skipped:
            warn(f"{self.sink.failures} MLflow calls to {self.tracking_uri} failed and {self.sink.skipped} "
                  f"were skipped in this process; the run folder holds every figure")

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        self.end("FAILED" if exc_type else "FINISHED")
