"""MLflow tracking. The URI is MLflow's own default (sqlite:///mlflow.db in the working
directory) unless MLFLOW_TRACKING_URI says otherwise."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param


def absolute_tracking_uri() -> str:
    """MLflow's URI with a relative sqlite path made absolute, so Ray workers (which run in
    another working directory) log into the same database as the driver."""
    uri = mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).absolute())
    return uri


class Tracker:
    """One MLflow run: flattened config as params, metrics with their step, artifacts.

    Through an `MlflowClient` bound to the URI, not mlflow's process-wide fluent state, so a
    tracker leaves no tracking URI or active run behind in the process that used it.
    """

    def __init__(self, experiment: str, run_name: str | None = None,
                 params: dict[str, Any] | None = None, resume_run_id: str | None = None):
        self.tracking_uri = absolute_tracking_uri()
        self.client = mlflow.MlflowClient(self.tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run = None
        if resume_run_id:  # a resumed training run continues its MLflow run's curves
            try:
                self.client.update_run(resume_run_id, status="RUNNING")
                self.run = self.client.get_run(resume_run_id)
            except mlflow.exceptions.MlflowException as exc:
                print(f"warning: cannot continue MLflow run {resume_run_id} ({exc}); starting a new one")
        if self.run is None:
            self.run = self.client.create_run(experiment_id, run_name=run_name)
        self.run_id = self.run.info.run_id
        logged = self.run.data.params  # a resumed run keeps the values it started with
        params = {k: str(v)[:6000] for k, v in (params or {}).items() if k not in logged}
        if params:
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def curves(self, prefix: str) -> dict[str, tuple[list[int], list[float]]]:
        """(steps, values) of every metric of this run whose name starts with `prefix`,
        including those Ray workers logged into it."""
        names = [k for k in self.client.get_run(self.run_id).data.metrics if k.startswith(prefix)]
        out = {}
        for name in names:
            history = sorted(self.client.get_metric_history(self.run_id, name), key=lambda m: m.step)
            out[name] = ([m.step for m in history], [m.value for m in history])
        return out

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, *_: Any) -> None:
        self.end("FAILED" if exc_type else "FINISHED")
