"""MLflow tracking for a sweep: one parent run on the driver, one child run per trial.

All writes happen on the driver through `MlflowClient` (one writer, so a SQLite store does not lock),
in batches: a trial's result is one `log_batch` call, not one call per metric (ECOSYSTEM.md: a
synchronous call costs ~75 ms against a server). Ray's own `MLflowLoggerCallback` makes one call per
metric key and no parent run, which is why this module exists.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ray.tune import Callback

from orchestrator.spec import SpecError, resolved_config, trial_spec
from orchestrator.trial import CURVE_METRICS, ONCE_METRICS, TIMING_METRICS

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
    """Batched MLflow writes for one experiment. Runs are created synchronously (their ids are needed at
    once); every other write goes to a background thread that merges what has queued up into one
    `log_batch` per run, so the driver never waits on the store (`flush()` waits for it)."""

    def __init__(self, tracking_uri: str, experiment: str, linger_s: float = 1.0) -> None:
        from mlflow import MlflowClient

        self.uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        self.write_seconds = 0.0  # time spent inside MLflow calls (the benchmark reports it)
        self.calls = 0
        with self._timed():
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self._queue: queue.Queue[tuple[str, str, Any] | None] = queue.Queue()
        self.linger_s = linger_s  # how long the writer lets writes accumulate before a round
        self._ids: dict[str, str] = {}  # start_run_later's handles -> run ids, once created
        self._writer = threading.Thread(target=self._drain, name="mlflow-writer", daemon=True)
        self._writer.start()
        self.errors: list[str] = []

    @contextlib.contextmanager
    def _timed(self) -> Any:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.write_seconds += time.perf_counter() - start
            self.calls += 1

    def start_run(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        """Create a run now and return its id (the sweep's parent, defender candidates)."""
        with self._timed():
            return self.client.create_run(
                self.experiment_id, tags=self._run_tags(name, tags, parent), run_name=name
            ).info.run_id

    def start_run_later(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        """Queue a run's creation and return a handle that every other method takes in place of its id
        (trial runs: the driver's event loop never waits on the store). `run_id(handle)` after `flush()`."""
        handle = f"pending-{uuid.uuid4().hex}"
        self._queue.put(("create", handle, (name, tags, parent)))
        return handle

    def run_id(self, handle: str) -> str | None:
        return self._ids.get(handle, None if handle.startswith("pending-") else handle)

    def _run_tags(self, name: str, tags: dict[str, str], parent: str | None) -> dict[str, str]:
        tags = {**tags, "mlflow.runName": name}
        if parent:
            tags["mlflow.parentRunId"] = self.run_id(parent) or parent
        return tags

    def log(
        self, run_id: str, params: dict[str, str] | None = None, metrics: list[tuple[str, float, int]] | None = None
    ) -> None:
        now = int(time.time() * 1000)
        clean = [(k, float(v), now, int(step)) for k, v, step in (metrics or []) if finite(v)]
        self._queue.put(("log", run_id, (dict(params or {}), clean)))

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self._queue.put(("tags", run_id, dict(tags)))

    def artifact(self, run_id: str, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self._queue.put(("artifact", run_id, (os.fspath(path), artifact_path)))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self._queue.put(("end", run_id, status))

    def flush(self) -> None:
        self._queue.join()

    def close(self) -> None:
        self.flush()
        self._queue.put(None)
        self._writer.join()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            batch = [item]
            if self.linger_s > 0:
                time.sleep(self.linger_s)  # let a trial's next events join this round: fewer, larger writes
            while len(batch) < 2000:  # whatever else is waiting goes in the same round of writes
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    self._queue.task_done()
                    break
                batch.append(more)
            try:
                self._write(batch)
            except Exception as err:  # a store error must not kill the writer (or the sweep)
                self.errors.append(f"{type(err).__name__}: {err}")
                print(f"resurgence: MLflow write failed: {self.errors[-1]}", flush=True)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _write(self, batch: list[tuple[str, str, Any]]) -> None:
        """One round of writes: queued runs are created, then each run's params, metrics and tags go in as
        few `log_batch` calls as MLflow's limits allow, then artifacts and run ends, in queue order."""
        from mlflow.entities import Metric, Param, RunTag

        params: dict[str, dict[str, str]] = {}
        metrics: dict[str, list[Metric]] = {}
        tags: dict[str, dict[str, str]] = {}
        with self._timed():
            for kind, handle, payload in batch:
                if kind == "create":
                    name, run_tags, parent = payload
                    run = self.client.create_run(
                        self.experiment_id, tags=self._run_tags(name, run_tags, parent), run_name=name
                    )
                    self._ids[handle] = run.info.run_id
                elif kind == "log":
                    params.setdefault(handle, {}).update(payload[0])
                    metrics.setdefault(handle, []).extend(Metric(k, v, ts, st) for k, v, ts, st in payload[1])
                elif kind == "tags":
                    tags.setdefault(handle, {}).update(payload)
            for handle in dict.fromkeys([*params, *metrics, *tags]):
                run_id = self.run_id(handle)
                plist = [Param(k, v) for k, v in params.get(handle, {}).items()]
                mlist = metrics.get(handle, [])
                tlist = [RunTag(k, v) for k, v in tags.get(handle, {}).items()]
                while plist or mlist or tlist:  # MLflow's limits: 100 params, 1000 metrics, 1000 items per call
                    p, plist = plist[:PARAMS_PER_BATCH], plist[PARAMS_PER_BATCH:]
                    room = METRICS_PER_BATCH - len(p)
                    m, mlist = mlist[:room], mlist[room:]
                    t, tlist = tlist[: room - len(m)], tlist[room - len(m) :]
                    self.client.log_batch(run_id, metrics=m, params=p, tags=t)
            for kind, handle, payload in batch:
                if kind == "artifact":
                    self.client.log_artifact(self.run_id(handle), payload[0], payload[1])
                elif kind == "end":
                    self.client.set_terminated(self.run_id(handle), payload)


def finite(v: Any) -> bool:
    """A real number, not nan or inf (metrics MLflow accepts; values a ranking can compare)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class MlflowTrials(Callback):
    """A Ray Tune callback that mirrors every trial into a child run of the sweep's parent run (or of its
    defender candidate's run). `sweep()` gives the tracker and the parent run id; it may block until MLflow
    is set up. Per-trial state is dropped when the trial ends, so memory stays bounded over waves."""

    def __init__(
        self,
        sweep: Callable[[], tuple[Tracker, str]],
        spec_data: dict[str, Any],
        tags: dict[str, str],
        parents: dict[Any, str] | None = None,
    ):
        self.sweep = sweep
        self.spec_data = spec_data
        self.tags = tags
        self.parents = parents if parents is not None else {}  # config "_candidate" value -> its run id
        self.runs: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self.logged_once: set[str] = set()
        self.artifacts: dict[str, str] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.cache_counts: dict[str, int] = {}  # erase cache outcomes: miss / hit / memo

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; the MLflow connection (a Future of a
        # thread, a client) does not travel and is given again to a resumed sweep.
        return {**self.__dict__, "sweep": None}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.runs:  # a restarted trial keeps its run
            return
        tracker, parent_id = self.sweep()
        candidate = trial.config.get("_candidate")
        resolved = resolved_config(trial_spec(self.spec_data, trial.config))
        run_tags = {
            **self.tags,
            "trial_id": trial.trial_id,
            "method": resolved["erase"]["method"],
            "concept": resolved["concept"]["name"],
            "model": resolved["model"]["name"],
            "stage": "trial",
            "searched": json.dumps(sorted(k for k in trial.config if not k.startswith("_"))),
        }
        if candidate is not None:
            run_tags["candidate"] = str(candidate)
        run_id = tracker.start_run_later(
            f"trial-{trial.trial_id}", run_tags, parent=self.parents.get(candidate, parent_id)
        )
        self.runs[trial.trial_id] = run_id
        tracker.log(run_id, params=flatten(resolved))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self.runs.get(trial.trial_id)
        if run_id is None or "ft_step" not in result:
            return
        step = int(result["ft_step"])
        batch = [(k, result[k], step) for k in CURVE_METRICS if k in result]
        tracker = self.sweep()[0]
        if trial.trial_id not in self.logged_once:
            batch += [(k, result[k], 0) for k in ONCE_METRICS if k in result]
            self.logged_once.add(trial.trial_id)
            if "erase_cache" in result:
                tracker.set_tags(run_id, {"erase_cache": str(result["erase_cache"])})
                self.cache_counts[result["erase_cache"]] = self.cache_counts.get(result["erase_cache"], 0) + 1
        tracker.log(run_id, metrics=batch)
        self.last[trial.trial_id] = {k: result[k] for k in TIMING_METRICS if k in result}
        if "samples_png" in result:
            self.artifacts[trial.trial_id] = result["samples_png"]

    def _close(self, trial: Any, status: str) -> None:
        run_id = self.runs.pop(trial.trial_id, None)
        if run_id is None:
            return
        tracker = self.sweep()[0]
        last = self.last.pop(trial.trial_id, {})
        tracker.log(run_id, metrics=[(k, v, 0) for k, v in last.items()])
        png = self.artifacts.pop(trial.trial_id, None)
        if png and Path(png).is_file():
            tracker.artifact(run_id, png)
        tracker.end(run_id, status)
        self.logged_once.discard(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "FAILED")


class Progress(Callback):
    """One readable line every `every_s` seconds (and at the end of each wave): trials done of the whole
    sweep, running, failed, the best metric so far and an ETA from the pace so far."""

    def __init__(self, total: int, metric: str, mode: str, every_s: float = 30.0, out: Any = None) -> None:
        self.total = total
        self.metric = metric
        self.sign = 1 if mode == "max" else -1
        self.every_s = every_s
        self.out = out
        self.start = time.monotonic()
        self.last_print = 0.0
        self.last_line = ""
        self.done = 0
        self.failed = 0
        self.running: set[str] = set()
        self.best: tuple[float, str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "out": None}

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        finished = self.done + self.failed
        eta = elapsed / finished * (self.total - finished) if finished else float("nan")
        best = f"{self.best[0]:.3f} (trial {self.best[1]})" if self.best else "none yet"
        return (
            f"[progress] {finished}/{self.total} trials done ({len(self.running)} running, {self.failed} failed)"
            f" | best {self.metric} {best} | elapsed {_duration(elapsed)} | ETA {_duration(eta)}"
        )

    def _maybe_print(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.last_print >= self.every_s:
            line = self.line()
            if (
                line.split(" | elapsed")[0] == self.last_line.split(" | elapsed")[0]
                and not now - self.last_print >= self.every_s
            ):
                return  # nothing new since the last line
            self.last_print, self.last_line = now, line
            print(line, file=self.out or sys.stdout, flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self._maybe_print()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        v = result.get(self.metric)
        if finite(v) and (self.best is None or self.sign * v > self.sign * self.best[0]):
            self.best = (float(v), trial.trial_id)
        self._maybe_print()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        self.done += 1
        self._maybe_print(force=self.done + self.failed == self.total)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        self.failed += 1
        self._maybe_print()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._maybe_print(force=True)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
