"""MLflow tracking for a sweep: one parent run on the driver, one child run per trial.

All writes happen on the driver through `MlflowClient` (one writer, so a SQLite store does not lock),
in batches: a trial's result is one `log_batch` call, not one call per metric (ECOSYSTEM.md: a
synchronous call costs ~75 ms against a server). Ray's own `MLflowLoggerCallback` makes one call per
metric key and no parent run, which is why this module exists.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray.tune import Callback

from orchestrator.spec import SpecError, resolved_config, trial_spec
from orchestrator.trial import CURVE_METRICS, ONCE_METRICS

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value, in characters
PARAMS_PER_BATCH = 100  # MlflowClient.log_batch limits
METRICS_PER_BATCH = 1000
VERSIONED = ("torch", "diffusers", "transformers", "ray", "mlflow", "optuna", "peft")
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_tracking_uri(uri: str) -> str:
    """Reject a tracking URI that cannot work, before anything runs; returns it unchanged."""
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme not in TRACKING_SCHEMES:
        raise SpecError(
            f"--tracking-uri: unsupported scheme {scheme or 'none'!r} in {uri!r} "
            f"(use one of {', '.join(TRACKING_SCHEMES)}; e.g. sqlite:///mlflow.db)"
        )
    if scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.parent.is_dir():
            raise SpecError(f"--tracking-uri: folder {path.parent} does not exist")
    return uri


def git_sha() -> str:
    """The commit of this code: $RESURGENCE_GIT_SHA if set (e.g. by a job without .git), else git's answer
    in the package's own checkout, else "unknown"."""
    if os.environ.get("RESURGENCE_GIT_SHA"):
        return os.environ["RESURGENCE_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def version_tags() -> dict[str, str]:
    tags = {}
    for pkg in VERSIONED:
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            tags[f"version.{pkg}"] = "absent"
    return tags


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings -> {"a.b.c": value}; lists and other leaves become JSON text."""
    if isinstance(data, dict) and data:
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    text = data if isinstance(data, str) else json.dumps(data, default=str)
    return {prefix: text[:MAX_PARAM_LEN]}


class Tracker:
    """Thin batched wrapper over MlflowClient for one experiment."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)

    def start_run(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        tags = {**tags, "mlflow.runName": name}
        if parent:
            tags["mlflow.parentRunId"] = parent
        return self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id

    def log(
        self, run_id: str, params: dict[str, str] | None = None, metrics: list[tuple[str, float, int]] | None = None
    ) -> None:
        from mlflow.entities import Metric, Param

        now = int(time.time() * 1000)
        params_list = [Param(k, v) for k, v in (params or {}).items()]
        metric_list = [
            Metric(k, float(v), now, int(step))
            for k, v, step in (metrics or [])
            if isinstance(v, int | float) and math.isfinite(v)
        ]
        for i in range(0, len(params_list), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=params_list[i : i + PARAMS_PER_BATCH])
        for i in range(0, len(metric_list), METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metric_list[i : i + METRICS_PER_BATCH])

    def artifact(self, run_id: str, path: str | os.PathLike[str]) -> None:
        self.client.log_artifact(run_id, os.fspath(path))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)


class MlflowTrials(Callback):
    """A Ray Tune callback that mirrors every trial into a child run of the sweep's parent run.
    `sweep()` gives the tracker and the parent run id; it may block until MLflow is set up."""

    def __init__(self, sweep: Callable[[], tuple[Tracker, str]], spec_data: dict[str, Any], tags: dict[str, str]):
        self.sweep = sweep
        self.spec_data = spec_data
        self.tags = tags
        self.runs: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self.logged_once: set[str] = set()
        self.artifacts: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; the MLflow connection (a Future of a
        # thread, a client) does not travel and is given again to a resumed sweep.
        return {**self.__dict__, "sweep": None}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.runs:  # a restarted trial keeps its run
            return
        tracker, parent_id = self.sweep()
        resolved = resolved_config(trial_spec(self.spec_data, trial.config))
        run_tags = {
            **self.tags,
            "trial_id": trial.trial_id,
            "method": resolved["erase"]["method"],
            "concept": resolved["concept"]["name"],
            "model": resolved["model"]["name"],
            "stage": "trial",
        }
        run_id = tracker.start_run(f"trial-{trial.trial_id}", run_tags, parent=parent_id)
        self.runs[trial.trial_id] = run_id
        tracker.log(run_id, params=flatten(resolved))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self.runs.get(trial.trial_id)
        if run_id is None or "ft_step" not in result:
            return
        step = int(result["ft_step"])
        batch = [(k, result[k], step) for k in CURVE_METRICS if k in result]
        if trial.trial_id not in self.logged_once:
            batch += [(k, result[k], 0) for k in ONCE_METRICS if k in result]
            self.logged_once.add(trial.trial_id)
        self.sweep()[0].log(run_id, metrics=batch)
        if "samples_png" in result:
            self.artifacts[trial.trial_id] = result["samples_png"]

    def _close(self, trial: Any, status: str) -> None:
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        tracker = self.sweep()[0]
        png = self.artifacts.get(trial.trial_id)
        if png and Path(png).is_file():
            tracker.artifact(run_id, png)
        tracker.end(run_id, status)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FAILED")
