"""The attacker: every grid cell's Optuna study (orchestrator/search.py) run in waves of Tune trials, each trial
an erase-then-fine-tune looking for the fine-tuning that brings the erased concept back; one MLflow child run
per trial under the sweep's parent run, and the sweep's summary metrics on the parent."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.callbacks import MlflowTrials, Progress
from orchestrator.formatting import finite
from orchestrator.ledger import TrialLedger
from orchestrator.paths import driver_folder
from orchestrator.resume import continue_trial_runs, new_metrics
from orchestrator.search import Cell, Row, grid_cells, run_waves
from orchestrator.spec import Experiment, ExperimentSpec
from orchestrator.writer import Tracker

Opening = Future  # of (Tracker, parent run id): MLflow's set-up overlaps the start of the first trials


def sweep_dir(spec: ExperimentSpec, run_name: str) -> Path:
    """The sweep's own folder on the driver (its spec copy, the Optuna journals)."""
    return driver_folder(spec.storage_path, spec.cache_dir) / run_name


def attacker_cells(spec: ExperimentSpec, prefix: str, fixed: dict[str, Any] | None = None) -> list[Cell]:
    return [
        Cell({**(fixed or {}), **grid}, study=f"{prefix}-cell{j}", seed=spec.search.seed + j)
        for j, grid in enumerate(grid_cells(spec.search.space))
    ]


@dataclass(frozen=True)
class SearchRun:
    """A sweep's search as `run_sweep` hands it to the attacker (`run_attack`) or the defender (`run_defense`),
    with what both do alike: the trials' bookkeeping and their waves."""

    experiment: Experiment  # the spec as run (overrides applied), parsed once
    opening: Opening
    run_name: str
    tags: dict[str, str]  # on every run
    lease: str | None  # the erase cache's lease actor (None: lock files on one machine)
    on_wave: Callable[[int, list[Row]], None] | None
    resumed: bool  # an earlier driver of this sweep died
    trial_fn: Callable[..., None] | None = None  # what each trial runs (None: the real trial)

    @property
    def spec(self) -> ExperimentSpec:
        return self.experiment.spec

    @property
    def folder(self) -> Path:
        return sweep_dir(self.spec, self.run_name)

    def bookkeeping(self, total: int, parents: dict[Any, str] | None = None) -> tuple[TrialLedger, list[Any]]:
        """The sweep's ledger, and the Tune callbacks that mirror trials into MLflow (`parents`: a defender
        candidate's run by its number) and print progress; a continued sweep's runs and ended trials count."""
        ledger = TrialLedger(self.folder)
        existing = continue_trial_runs(self.opening.result()[0], self.run_name, ledger) if self.resumed else {}
        callback = MlflowTrials(self.opening.result, self.tags, parents=parents, existing=existing)
        s = self.spec.search
        return ledger, [callback, Progress(total, s.metric, s.mode, ended=ledger.done().values())]

    def waves(
        self, cells: list[Cell], name: str, ledger: TrialLedger, callbacks: list[Any], slot_prefix: str = ""
    ) -> list[Row]:
        """`search.num_samples` trials of every cell, in waves (orchestrator/search.py)."""
        return run_waves(
            self.experiment,
            cells=cells,
            per_cell=self.spec.search.num_samples,
            run_name=name,
            study_path=self.folder / "optuna.journal",
            callbacks=callbacks,
            lease_actor=self.lease,
            ledger=ledger,
            on_wave=self.on_wave,
            slot_prefix=slot_prefix,
            trial_fn=self.trial_fn,
        )


def run_attack(run: SearchRun) -> list[Row]:
    cells = attacker_cells(run.spec, run.run_name)
    ledger, callbacks = run.bookkeeping(len(cells) * run.spec.search.num_samples)
    rows = run.waves(cells, run.run_name, ledger, callbacks)
    tracker, parent = run.opening.result()
    log_summary(tracker, parent, rows, run.spec, run.resumed)
    return rows


def log_summary(tracker: Tracker, parent: str, rows: list[Row], spec: ExperimentSpec, resumed: bool) -> None:
    ok = [r for r in rows if not r["error"]]
    best = rank(rows, spec)[0] if ok else None
    metrics = [("trials_completed", len(ok), 0), ("trials_failed", len(rows) - len(ok), 0)]
    cache = Counter(r["erase_cache"] for r in rows if r.get("erase_cache"))  # miss / hit / memo, over all drivers
    metrics += [(f"erase_cache_{k}", v, 0) for k, v in sorted(cache.items())]
    if best is not None and finite(best[spec.search.metric]):
        metrics.append((f"best_{spec.search.metric}", best[spec.search.metric], 0))
    if resumed:  # the dead driver may have logged them already (it died writing the report)
        metrics = new_metrics(logged_metrics(tracker, parent), metrics)
    tracker.log(parent, metrics=metrics)


def logged_metrics(tracker: Tracker, run_id: str) -> dict[str, float]:
    tracker.flush()
    return dict(tracker.client.get_run(run_id).data.metrics)


# -- summaries -------------------------------------------------------------------------------------------
def rank(rows: list[Row], spec: ExperimentSpec) -> list[Row]:
    """Best first; trials without the metric after, errors last."""
    sign = -1 if spec.search.mode == "max" else 1
    metric = spec.search.metric
    return sorted(
        rows,
        key=lambda r: (r["error"], not finite(r.get(metric)), sign * r[metric] if finite(r.get(metric)) else 0.0),
    )
