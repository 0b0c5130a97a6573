"""Ray Tune callbacks on the driver: every trial mirrored into MLflow (`MlflowTrials`, through the sweep's
`Tracker`) and one readable progress line for the console (`Progress`)."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from ray.tune import Callback

from orchestrator.formatting import finite
from orchestrator.ledger import SLOT_KEY
from orchestrator.metric_names import ONCE_METRICS, TIMING_METRICS, curve_keys
from orchestrator.redaction import redact
from orchestrator.resolved import RESOLVED_KEY, ResolvedTrial
from orchestrator.spec import concept_tag
from orchestrator.writer import Tracker, flatten


class MlflowTrials(Callback):
    """A Ray Tune callback that mirrors every trial into a child run of the sweep's parent run (or of its
    defender candidate's run). `sweep()` gives the tracker and the parent run id; it may block until MLflow
    is set up. Per-trial state is dropped when the trial ends, so memory stays bounded over waves.

    Exactly one run per trial, whatever happens to it. A trial is its slot (the sweep's name for it, tag
    `trial_id`; Tune's own id of its latest attempt is tag `tune_trial_id`): a trial that Tune retries (it
    raised, its worker died) keeps its run, and so does one that a continued sweep runs again (`existing`:
    the runs an earlier driver made, by slot). A report whose `ft_step` the run already holds is not logged
    again, so a trial that continues from a checkpoint, or starts over, never writes a step twice."""

    def __init__(
        self,
        sweep: Callable[[], tuple[Tracker, str]],
        tags: dict[str, str],
        parents: dict[Any, str] | None = None,
        existing: dict[str, tuple[str, int]] | None = None,
    ):
        self.sweep = sweep
        self.tags = tags
        self.parents = parents if parents is not None else {}  # config "_candidate" value -> its run id
        self.wave = ""  # the Tuner run (wave) the trials belong to; run_waves sets it
        self.runs: dict[str, str] = {}  # Tune trial id -> MLflow run id (or the tracker's handle)
        self.existing = dict(existing or {})  # slot -> (run id, last logged ft_step), earlier drivers'
        self.steps: dict[str, int] = {}  # trial id -> the last ft_step its run holds
        self.logged_once: set[str] = set()
        self.artifacts: dict[str, str] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.outcome: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the experiment state; the MLflow connection (a Future of a
        # thread, a client) does not travel and is given again to a resumed sweep.
        return {**self.__dict__, "sweep": None}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.trial_id in self.runs:  # a retried trial keeps its run
            return
        tracker, parent_id = self.sweep()
        slot = str(trial.config.get(SLOT_KEY, trial.trial_id))
        if slot in self.existing:  # begun by an earlier driver of this sweep: the same run goes on
            run_id, step = self.existing.pop(slot)
            tracker.set_tags(run_id, {"tune_trial_id": trial.trial_id})
            self.runs[trial.trial_id], self.steps[trial.trial_id] = run_id, step
            self.logged_once.add(trial.trial_id)
            return
        candidate = trial.config.get("_candidate")
        resolved: ResolvedTrial = trial.config[RESOLVED_KEY]  # built by the searcher (orchestrator/search.py)
        params = resolved.params
        run_tags = {
            **self.tags,
            "trial_id": slot,
            "tune_trial_id": trial.trial_id,
            "wave": self.wave,
            "method": params["erase"]["method"],
            "concept": concept_tag(resolved.spec),
            "model": params["model"]["name"],
            "stage": "trial",
            "searched": json.dumps(sorted(k for k in trial.config if not k.startswith("_"))),
        }
        if candidate is not None:
            run_tags["candidate"] = str(candidate)
        run_id = tracker.start_run_later(f"trial-{slot}", run_tags, parent=self.parents.get(candidate, parent_id))
        self.runs[trial.trial_id] = run_id
        tracker.log(run_id, params=redact(flatten(params)))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self.runs.get(trial.trial_id)
        if run_id is None or "ft_step" not in result:
            return
        step = int(result["ft_step"])
        if step <= self.steps.get(trial.trial_id, -1):
            return  # the run holds this step already (a retried or resumed trial repeats its early reports)
        self.steps[trial.trial_id] = step
        batch = [(k, result[k], step) for k in (*curve_keys(result), "ft_step") if k in result]
        tracker = self.sweep()[0]
        if trial.trial_id not in self.logged_once:
            batch += [(k, result[k], 0) for k in ONCE_METRICS if k in result]
            self.logged_once.add(trial.trial_id)
            if "erase_cache" in result:
                tracker.set_tags(run_id, {"erase_cache": str(result["erase_cache"])})
        if result.get("diverged"):
            batch.append(("diverged", 1.0, step))
            self.outcome[trial.trial_id] = "diverged"
        tracker.log(run_id, metrics=batch)
        self.last[trial.trial_id] = {k: result[k] for k in TIMING_METRICS if k in result}
        if "samples_png" in result:
            self.artifacts[trial.trial_id] = result["samples_png"]

    def _close(self, trial: Any, outcome: str) -> None:
        run_id = self.runs.pop(trial.trial_id, None)
        if run_id is None:
            return
        tracker = self.sweep()[0]
        last = self.last.pop(trial.trial_id, {})
        tracker.log(run_id, metrics=[(k, v, 0) for k, v in last.items()])
        png = self.artifacts.pop(trial.trial_id, None)
        if png:
            tracker.artifact(run_id, png)
        outcome = self.outcome.pop(trial.trial_id, outcome)
        tracker.set_tags(run_id, {"outcome": outcome})
        tracker.end(run_id, "FINISHED" if outcome == "completed" else "FAILED")
        self.logged_once.discard(trial.trial_id)
        self.steps.pop(trial.trial_id, None)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tracker = self.sweep()[0]
        run_id = self.runs.get(trial.trial_id)
        if run_id is not None:  # Tune runs it again (from its last checkpoint, if any): say so on the run
            retries = int(getattr(trial, "num_failures", 0))
            tracker.set_tags(run_id, {"retries": str(retries)})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "completed")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, "error")


class Progress(Callback):
    """One readable line every `every_s` seconds (and at the end of each wave): trials done of the whole
    sweep, running, failed, the best metric so far and an ETA from the pace so far."""

    def __init__(
        self,
        total: int,
        metric: str,
        mode: str,
        every_s: float = 30.0,
        out: Any = None,
        ended: Iterable[dict[str, Any]] = (),
    ) -> None:
        """`ended`: rows of the trials that ended before this driver (a continued sweep counts them)."""
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
        for row in ended:
            self.failed += bool(row.get("error"))
            self.done += not row.get("error")
            v = row.get(metric)
            if not row.get("error") and finite(v) and (self.best is None or self.sign * v > self.sign * self.best[0]):
                self.best = (float(v), str(row.get("trial")))

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

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._maybe_print()  # Tune's loop turns several times a second: a line every every_s, even between results

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self._maybe_print()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        v = result.get(self.metric)
        if finite(v) and (self.best is None or self.sign * v > self.sign * self.best[0]):
            self.best = (float(v), str(trial.config.get(SLOT_KEY, trial.trial_id)))
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
