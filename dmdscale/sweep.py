"""Hyperparameter sweeps with Ray Tune: each trial is one whole dmdscale run.

The driver (`run`) checks the sweep before any cluster work, trains or loads the teacher and
classifier once (cached under cache_dir, so trials find them), then runs Tune function trials.
Each trial builds its config from the base config and its sampled values and calls the
whole run (`dmdscale.driver.run`, which fits a TorchTrainer, the Train V2 pattern), reporting
every checkpoint evaluation's FID to Tune as it lands, so ASHA can stop trials that trail, and the final figures at the end. Each trial is an MLflow run tagged
with the sweep's run as its parent; the sweep's run gets the results table, the best config
and a picture of every trial's FID curve. An interrupted sweep resumes from DIR.

DIR layout: tune/ (Tune's experiment state), trials/<trial id>/ (each trial's run folder),
sweep_config.yaml (what DIR was started with), results.csv, best_config.yaml, sweep.png.
"""
from __future__ import annotations

import difflib
import functools
import json
import math
import os
from pathlib import Path
from typing import Any

import yaml

from dmdscale.config import Config, ConfigError, SearchDimension, build_config
from dmdscale.distributed.resources import run_resources, uses_eval_actors
from dmdscale.families import FAMILIES, resolve

TUNE_DIR = "tune"
TRIALS_DIR = "trials"
SWEEP_TAG = "dmdscale.sweep"  # on each trial's MLflow run: the sweep's run id
# The trial itself only drives its run (whose workers and actors hold the resources), but Tune
# needs a non-empty request for it: a sliver of a CPU, left out of the run's own plan.
TRIAL_DRIVER_CPUS = 0.05


def trial_config(base: Config, values: dict[str, Any]) -> Config:
    """The base config with a trial's dotted `values` applied (validated)."""
    return build_config(base.model_dump(mode="json"), values)


def absolute_paths(cfg: Config) -> Config:
    """Local paths made absolute: trials run in other working directories."""
    def absolute(value: str | None, must_exist: bool = False) -> str | None:
        if value is None or "://" in value or value in ("digits", "train", "analytic"):  # not paths
            return value
        path = Path(value).expanduser()
        return str(path.absolute()) if path.exists() or not must_exist else value

    return trial_config(cfg, {"cache_dir": absolute(cfg.cache_dir), "data.path": absolute(cfg.data.path),
                              "data.eval_path": absolute(cfg.data.eval_path),
                              "data.latent_cache": absolute(cfg.data.latent_cache),
                              "scale.storage_path": absolute(cfg.scale.storage_path),
                              "model.teacher": absolute(cfg.model.teacher, must_exist=True)})  # else a hub id


def check_sweep(cfg: Config) -> None:
    """Every swept key and value must make a valid run config, and the search and early
    stopping must fit the family: ConfigError naming `sweep.*` keys, before any cluster work."""
    sweep = cfg.sweep
    family = resolve(cfg)
    if not family.trains_on_ray:
        on_ray = ", ".join(name for name, family in FAMILIES.items() if family.trains_on_ray)
        raise ConfigError(f"model.family: sweeps run Ray Train families ({on_ray}), not {cfg.model.family!r}")
    if not sweep.space:
        raise ConfigError("sweep.space: no keys to sweep")
    for key, dim in sweep.space.items():
        if key.startswith(("sweep.", "quick")):
            raise ConfigError(f"sweep.space.{key}: the sweep section itself cannot be swept")
        if sweep.search == "grid" and dim.values is None:
            raise ConfigError(f"sweep.space.{key}: grid search needs a list of values (values: [...]), "
                              f"not a range; or use sweep.search=random or bayesian")
        candidates = dim.values if dim.values is not None else [dim.low, dim.high]
        if dim.integer and dim.values is None:
            candidates = [math.ceil(dim.low), math.floor(dim.high)]
        for value in candidates:
            try:
                resolve(trial_config(cfg, {key: value}))
            except ConfigError as exc:
                raise ConfigError(f"sweep.space.{key}: value {value!r} does not make a valid run: {exc}") from None
    reported = family.metric_names(cfg)
    if sweep.metric not in reported:  # else every trial would train in full before Tune refused it
        close = difflib.get_close_matches(sweep.metric, sorted(reported), n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ConfigError(f"sweep.metric: {sweep.metric!r} is not a figure {cfg.model.family} runs report; {hint}"
                          f"they report {', '.join(sorted(reported))}")
    if sweep.early_stopping == "asha" and not uses_eval_actors(cfg, family):
        evaluated = ", ".join(name for name, family in FAMILIES.items() if family.has_eval_actors)
        raise ConfigError(f"sweep.early_stopping: asha stops trials on the FID of checkpoints evaluated during "
                          f"training, which needs a family with evaluation actors ({evaluated}) and "
                          f"eval.during_training=true; set sweep.early_stopping=none")


def search_space(cfg: Config) -> dict[str, Any]:
    """Tune's param_space: grid_search for grid, choice or (log)uniform samplers otherwise."""
    from ray import tune

    def dimension(dim: SearchDimension) -> Any:
        if dim.values is not None:
            return tune.grid_search(dim.values) if cfg.sweep.search == "grid" else tune.choice(dim.values)
        if dim.integer:
            low, high = math.ceil(dim.low), math.floor(dim.high) + 1  # randint's high is exclusive
            return tune.lograndint(low, high) if dim.log else tune.randint(low, high)
        return tune.loguniform(dim.low, dim.high) if dim.log else tune.uniform(dim.low, dim.high)

    return {key: dimension(dim) for key, dim in cfg.sweep.space.items()}


def current_values(cfg: Config) -> dict[str, Any]:
    """The swept keys' values in the base config: the first point random and Bayesian
    searches try, so the sweep always holds the config as written as a baseline."""
    flat = cfg.flat()
    return {key: flat[key] for key in cfg.sweep.space}


def searcher(cfg: Config, max_concurrent: int) -> Any:
    """The search algorithm, holding at most `max_concurrent` trials running at once."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if cfg.sweep.search == "grid":
        return BasicVariantGenerator(max_concurrent=max_concurrent)
    if cfg.sweep.search == "random":
        return BasicVariantGenerator(points_to_evaluate=[current_values(cfg)], random_state=cfg.train.seed,
                                     max_concurrent=max_concurrent)
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(points_to_evaluate=[current_values(cfg)], seed=cfg.train.seed),
                              max_concurrent=max_concurrent)


def scheduler(cfg: Config) -> Any:
    """ASHA on the checkpoint evaluations' metric, by training step; or FIFO."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.sweep.early_stopping == "none":
        return FIFOScheduler()
    grace = cfg.sweep.grace_period or 2 * cfg.train.checkpoint_every
    return ASHAScheduler(time_attr="step", max_t=cfg.train.max_steps, grace_period=min(grace, cfg.train.max_steps),
                         reduction_factor=cfg.sweep.reduction_factor)


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial takes from the cluster: its run's (the resource planner's figure) and
    the trial's own driver."""
    need = run_resources(cfg, resolve(cfg))
    return need | {"CPU": need["CPU"] + TRIAL_DRIVER_CPUS}


def concurrent_trials(cfg: Config, cluster: dict[str, float]) -> int:
    """Trials at a time: `sweep.max_concurrent_trials`, else as many whole trials as the
    cluster's resources hold right now (at least one; CPU workers may run on a share of a CPU)."""
    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials
    need = trial_resources(cfg)
    fits = min(int(cluster.get(name, 0.0) // amount) for name, amount in need.items() if amount > 0)
    return max(1, fits)


class TrialRun:
    """Runs one trial's whole run, as a Ray actor outside the trial's placement group (Tune
    captures a trial's child tasks and actors into its own reservation, where Ray Data's
    tasks and the evaluation actors would not fit), keeping the checkpoint evaluations for
    the trial to poll. Owned by the trial: it dies with a trial that Tune stops."""

    def __init__(self, tracking_uri: str | None):
        import threading

        if tracking_uri:  # the sweep's store, not a relative sqlite path in this worker's cwd
            os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
        self._lock, self._evaluations = threading.Lock(), []

    def run(self, cfg_tree: dict[str, Any], out: str, tags: dict[str, str]) -> dict[str, Any]:
        cfg = build_config(cfg_tree)
        from dmdscale.driver import run

        keep = self._keep if uses_eval_actors(cfg, resolve(cfg)) else None
        return run(cfg, Path(out), run_tags=tags, on_evaluation=keep)

    def _keep(self, result: dict[str, Any]) -> None:
        with self._lock:
            self._evaluations.append(result)

    def evaluations(self, start: int) -> list[dict[str, Any]]:
        with self._lock:
            return self._evaluations[start:]


def run_trial(values: dict[str, Any], *, base: dict[str, Any], out: str, cluster_cpus: float | None,
              sweep_run_id: str | None, tracking_uri: str | None, poll_seconds: float = 2.0) -> None:
    """One Tune function trial: the family's whole run in DIR/trials/<trial id> (on a
    `TrialRun` actor), reporting each checkpoint evaluation to Tune as it lands, then the
    final figures. A failed run raises here, so Tune records the trial as an error."""
    import ray
    from ray import tune
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    trial_id = tune.get_context().get_trial_id()  # the same after the sweep is restored
    overrides = dict(values) | ({"scale.cluster_cpus": cluster_cpus} if cluster_cpus else {})
    cfg = trial_config(build_config(base), overrides)
    metric = cfg.sweep.metric
    tags = {SWEEP_TAG: sweep_run_id, "mlflow.parentRunId": sweep_run_id} if sweep_run_id else {}
    tags |= {"dmdscale.trial": trial_id}
    runner = ray.remote(TrialRun).options(
        num_cpus=0, max_concurrency=2,  # `evaluations` answers while `run` runs
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    ).remote(tracking_uri)
    done = runner.run.remote(cfg.model_dump(mode="json"), str(Path(out) / TRIALS_DIR / trial_id), tags)
    reported = 0
    while True:
        finished, _ = ray.wait([done], timeout=poll_seconds)
        for result in ray.get(runner.evaluations.remote(reported)):
            reported += 1
            value = result.get(metric)
            if value is not None and math.isfinite(value):
                tune.report({metric: value, "step": result["step"], "final": 0})
        if finished:
            break
    metrics = ray.get(done)  # raises the run's own error
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tune.report(numbers | {"step": cfg.train.max_steps, "final": 1})


def prepare(cfg: Config) -> None:
    """The cheap checks first (data, teacher, tracking server, the cluster holds one trial's run),
    then build what every trial would otherwise build at once (e.g. data, classifier, teacher)."""
    from dmdscale.distributed.cluster import connect, ensure_fits
    from dmdscale.tracking import absolute_tracking_uri, check_tracking_server

    family = resolve(cfg)
    inputs = family.preflight(cfg)
    check_tracking_server(absolute_tracking_uri())
    connect(log_to_driver=True)
    ensure_fits(cfg, family)
    family.prepare(cfg, inputs)


def _check_same_sweep(cfg: Config, out: Path) -> bool:
    """True if DIR holds a sweep to resume; a different config there is an error."""
    saved = out / "sweep_config.yaml"
    if not saved.is_file():
        return False
    before = build_config(yaml.safe_load(saved.read_text()))
    old, new = before.model_dump(mode="json"), cfg.model_dump(mode="json")
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        raise ConfigError(f"{out} holds a sweep started with a different config (sections: {', '.join(changed)}); "
                          f"resume it with the same config, or use another --out")
    return (out / TUNE_DIR).is_dir()


def trials(result_grid: Any, experiment: Path) -> list[tuple[str, str, Any]]:
    """(trial id, Tune status, Result) per trial. The status is the one saved in the
    experiment's state (what a resume continues from): PENDING or RUNNING there means the sweep
    was interrupted before the trial ended (Tune's in-memory trials are stopped by then)."""
    from ray.tune import ExperimentAnalysis

    saved = {trial.trial_id: trial.status for trial in ExperimentAnalysis(str(experiment)).trials}
    live = result_grid._experiment_analysis.trials  # ResultGrid keeps them in its results' order
    return [(trial.trial_id, saved.get(trial.trial_id, trial.status), result)
            for trial, result in zip(live, result_grid)]


def results_table(entries: list[tuple[str, str, Any]], cfg: Config) -> "Any":
    """One row per trial: its id, status, swept values, final (or last) metric, the best
    checkpoint evaluation, the steps it reached, and its error if it failed."""
    import pandas as pd

    metric, rows = cfg.sweep.metric, []
    for trial, state, result in entries:
        history = result.metrics_dataframe
        last = result.metrics or {}
        evaluations = history[history["final"] == 0] if history is not None and "final" in history else None
        best_seen = None
        if evaluations is not None and metric in evaluations and len(evaluations):
            best_seen = evaluations[metric].min() if cfg.sweep.mode == "min" else evaluations[metric].max()
        if state not in ("TERMINATED", "ERROR"):
            status = "interrupted"
        elif result.error:
            status = "error"
        else:
            status = "finished" if last.get("final") == 1 else "stopped early"
        row = {"trial": trial, "status": status}
        row |= {key: (result.config or {}).get(key) for key in cfg.sweep.space}
        row |= {metric: last.get(metric), f"best_checkpoint_{metric}": best_seen, "steps": last.get("step"),
                "error": str(result.error).strip().splitlines()[-1][:200] if result.error else ""}
        rows.append(row)
    table = pd.DataFrame(rows)
    if not len(table):
        return table
    order = table["status"].map({"finished": 0, "stopped early": 1, "interrupted": 2, "error": 3})
    table = table.assign(_order=order).sort_values(["_order", metric], ascending=[True, cfg.sweep.mode == "min"],
                                                   na_position="last")
    return table.drop(columns="_order").reset_index(drop=True)


def best_row(table: Any, cfg: Config) -> dict[str, Any] | None:
    """The best finished trial (partly trained trials' figures are not comparable)."""
    done = table[(table["status"] == "finished") & table[cfg.sweep.metric].notna()] if len(table) else table
    if not len(done):
        return None
    index = done[cfg.sweep.metric].idxmin() if cfg.sweep.mode == "min" else done[cfg.sweep.metric].idxmax()
    return done.loc[index].to_dict()


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def plot_trials(entries: list[tuple[str, str, Any]], cfg: Config, path: Path) -> Path:
    """Every trial's metric against training step (checkpoint evaluations, then the final
    figure) on one axis, labelled with its swept values."""
    from dmdscale.eval.plots import plot_overlay

    metric, curves = cfg.sweep.metric, {}
    for trial, state, result in entries:
        history = result.metrics_dataframe
        if history is None or metric not in history or "step" not in history:
            continue
        points = history[["step", metric]].dropna().sort_values("step")
        config = result.config or {}
        values = ", ".join(f"{key.rsplit('.', 1)[-1]}={_short(config.get(key))}" for key in cfg.sweep.space)
        ended = " (error)" if state == "ERROR" else ("" if (result.metrics or {}).get("final") == 1 else " (stopped)")
        label = f"{trial}: {values}{ended}"
        curves[label] = (points["step"].astype(int).tolist(), points[metric].astype(float).tolist())
    return plot_overlay(curves, path, metric, title=f"sweep: {metric} by trial")


def print_table(table: Any, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    view = Table(title=title)
    for column in table.columns:
        view.add_column(str(column))
    for row in table.itertuples(index=False):
        view.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row])
    Console(width=200).print(view)


def run(cfg: Config, out: Path) -> dict[str, Any]:
    """The sweep into `out`; returns {"best": row or None, "trials": n, ...}."""
    import ray
    from ray import tune

    from dmdscale.tracking import Tracker

    check_sweep(cfg)
    cfg = absolute_paths(cfg)
    out = out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    resuming = _check_same_sweep(cfg, out)
    (out / "sweep_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    prepare(cfg)
    cluster = ray.cluster_resources()
    slots = concurrent_trials(cfg, cluster)
    # CPU trials plan their workers within their share of the CPUs (scale.cluster_cpus).
    cluster_cpus = None if cfg.scale.use_gpu else cluster.get("CPU", 1.0) / slots - TRIAL_DRIVER_CPUS
    state_file = out / "sweep_state.json"
    saved = json.loads(state_file.read_text()) if resuming and state_file.is_file() else {}
    params = {f"sweep.{k}": v for k, v in cfg.sweep.model_dump(mode="json").items()} | cfg.flat()
    with Tracker(cfg.name, run_name=f"sweep-{out.name}", params=params,
                 resume_run_id=saved.get("mlflow_run_id")) as tracker:
        state_file.write_text(json.dumps({"mlflow_run_id": tracker.run_id}))
        trainable = tune.with_resources(
            functools.partial(run_trial, base=cfg.model_dump(mode="json"), out=str(out), cluster_cpus=cluster_cpus,
                              sweep_run_id=tracker.run_id, tracking_uri=tracker.tracking_uri),
            {"CPU": TRIAL_DRIVER_CPUS})
        if resuming:
            print(f"dmdscale: resuming the sweep in {out}")
            tuner = tune.Tuner.restore(str(out / TUNE_DIR), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable, param_space=search_space(cfg),
                tune_config=tune.TuneConfig(metric=cfg.sweep.metric, mode=cfg.sweep.mode,
                                            search_alg=searcher(cfg, slots), scheduler=scheduler(cfg),
                                            num_samples=cfg.sweep.num_samples),
                run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(out),
                                          failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
            )
        print(f"dmdscale: sweeping {', '.join(cfg.sweep.space)} ({cfg.sweep.search} search, "
              f"{cfg.sweep.num_samples} samples, {slots} trial(s) at a time, early stopping: {cfg.sweep.early_stopping})")
        result_grid = tuner.fit()
        entries = trials(result_grid, out / TUNE_DIR)
        unfinished = sum(status not in ("TERMINATED", "ERROR") for _, status, _ in entries)
        table = results_table(entries, cfg)
        table.to_csv(out / "results.csv", index=False)
        best = best_row(table, cfg)
        if best is not None:
            best_cfg = trial_config(cfg, {k: best[k] for k in cfg.sweep.space})
            (out / "best_config.yaml").write_text(
                f"# best of the sweep in {out}: trial {best['trial']}, {cfg.sweep.metric} {best[cfg.sweep.metric]:.4g}\n"
                + yaml.safe_dump(best_cfg.model_dump(mode="json", exclude={"sweep"}), sort_keys=False))
        plot_trials(entries, cfg, out / "sweep.png")
        if not unfinished:
            _close_trial_runs(tracker)
        summary = {"trials": len(table), "finished": int((table["status"] == "finished").sum()) if len(table) else 0,
                   "errors": int((table["status"] == "error").sum()) if len(table) else 0,
                   "concurrent_trials": slots}
        if best is not None:
            summary[f"best_{cfg.sweep.metric}"] = float(best[cfg.sweep.metric])
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))}, step=0)
        for name in ("results.csv", "best_config.yaml", "sweep.png"):
            if (out / name).is_file():
                tracker.log_artifact(out / name)
    print_table(table, f"sweep {out.name}: {cfg.sweep.metric} ({cfg.sweep.mode})")
    if unfinished:  # Ctrl-C: Tune saved its state; the table above is what finished so far
        tracker.client.set_terminated(tracker.run_id, "KILLED")
        raise SystemExit(f"dmdscale: the sweep was interrupted with {unfinished} trial(s) unfinished; "
                         f"run the same command again to resume it")
    if best is not None:
        print(f"dmdscale: best trial {best['trial']}: {cfg.sweep.metric} {best[cfg.sweep.metric]:.4g}; "
              f"its config is {out / 'best_config.yaml'}")
    return summary | {"best": best}


def _close_trial_runs(tracker: Any) -> None:
    """Trials Tune stopped early were killed mid-run: their MLflow runs end as KILLED."""
    try:
        runs = tracker.client.search_runs([tracker.run.info.experiment_id],
                                          filter_string=f"tags.`{SWEEP_TAG}` = '{tracker.run_id}'")
        for child in runs:
            if child.info.status == "RUNNING":
                tracker.client.set_tag(child.info.run_id, "dmdscale.stopped_early", "true")
                tracker.client.set_terminated(child.info.run_id, "KILLED")
    except Exception as exc:  # tracking never fails a finished sweep
        print(f"warning: could not close the stopped trials' MLflow runs: {exc}")
