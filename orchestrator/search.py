"""The search: an experiment spec becomes waves of Ray Tune runs driven by persistent Optuna studies.

- **Dimensions** map dotted spec paths to distributions. `grid` dimensions (methods, concepts, models,
  ...) split the sweep into *cells*, one per combination; every cell gets its own Optuna study over the
  other dimensions, `search.num_samples` trials each, so one method's results never steer another's.
  `CellSearch` is the Tune searcher that hands out the cells' suggestions round-robin.
- **Waves**: Tune keeps every trial of a run in the driver's memory, so a long sweep runs as a sequence of
  Tuner runs (`search.wave_size` trials each). Each cell's study lives in an Optuna journal file under
  the sweep's folder and is loaded again by the next wave, so the search continues where it was.
- **Early stopping**: ASHA stops unpromising fine-tunes on the scheduler's metric over `ft_step` (the
  fine-tuning step), which can be the cheap `resurgence_proxy` while the searcher learns from the full
  `resurgence` at the end of each trial.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.search import Searcher

from orchestrator.spec import Dimension, ExperimentSpec, max_finetune_steps


def tune_domain(dim: Dimension) -> Any:
    from ray import tune

    if dim.loguniform is not None:
        return tune.loguniform(*dim.loguniform)
    if dim.uniform is not None:
        return tune.uniform(*dim.uniform)
    if dim.randint is not None:
        low, high = dim.randint
        return tune.randint(low, high + 1)  # Tune's upper bound is exclusive; ours is inclusive
    return tune.choice(list(dim.choice or []))


def grid_cells(space: dict[str, Dimension]) -> list[dict[str, Any]]:
    """Every combination of the grid dimensions' values ([{}] without grid dimensions)."""
    grid = {path: dim.grid for path, dim in space.items() if dim.grid is not None}
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def sampled_space(space: dict[str, Dimension]) -> dict[str, Dimension]:
    return {path: dim for path, dim in space.items() if dim.grid is None}


@dataclass(frozen=True)
class Cell:
    """One independent search of the sweep: fixed values and the study that samples the rest."""

    fixed: dict[str, Any]  # dotted path -> value (grid values; a defender candidate's settings; "_" keys)
    study: str  # Optuna study name
    seed: int  # the sampler's seed


def make_sampler(algorithm: str, seed: int) -> Any:
    import optuna

    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def study_storage(path: Path) -> Any:
    """A persistent Optuna storage that several Tuner runs (waves) load in turn: a journal file."""
    import optuna

    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def fail_running(path: Path) -> int:
    """Mark every still-running trial of every study in the journal as failed (trials a dead driver had
    asked for, which will never be told); returns how many."""
    import optuna

    if not path.is_file():
        return 0
    storage = study_storage(path)
    failed = 0
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            failed += 1
    return failed


class CellSearch(Searcher):
    """A Tune searcher over several cells: trial i of the wave goes to cell `order[i]`, and its sampled
    values come from that cell's OptunaSearch (loaded from the persistent study). Results reach the cell
    that suggested the trial; intermediate results without the metric (rungs that saw only the proxy)
    are not passed on."""

    def __init__(
        self,
        cells: list[Cell],
        order: list[int],
        space: dict[str, Dimension],
        *,
        metric: str,
        mode: str,
        algorithm: str,
        storage: Any,
    ) -> None:
        from ray.tune.search.optuna import OptunaSearch

        super().__init__()  # no metric of its own: Tune then does not require it in every result
        self.cells = cells
        self.order = list(order)
        self.search_metric = metric
        self.subs: dict[int, Any] = {}
        if space:
            converted = OptunaSearch.convert_search_space({p: tune_domain(d) for p, d in space.items()})
            for i in sorted(set(order)):
                self.subs[i] = OptunaSearch(
                    space=converted,
                    metric=metric,
                    mode=mode,
                    sampler=make_sampler(algorithm, cells[i].seed),
                    study_name=cells[i].study,
                    storage=storage,
                )
        self.next = 0
        self.trial_cell: dict[str, int] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # the cells carry their own metric, mode and space

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.next >= len(self.order):
            return Searcher.FINISHED
        i = self.order[self.next]
        self.next += 1
        self.trial_cell[trial_id] = i
        sampled = self.subs[i].suggest(trial_id) if i in self.subs else {}
        return {**self.cells[i].fixed, **(sampled or {})}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        i = self.trial_cell.get(trial_id)
        if i in self.subs and self.search_metric in result:
            self.subs[i].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        i = self.trial_cell.get(trial_id)
        if i in self.subs:
            self.subs[i].on_trial_complete(trial_id, result, error)

    # Tune snapshots its searcher with the experiment state (for Tuner.restore): where the wave is, and
    # each cell's searcher (whose study also lives in the journal file), all in the one file Tune names
    # (it writes a temporary name and renames it: files of our own beside it would be left behind).
    def save(self, checkpoint_path: str) -> None:
        cells = {}
        for i, sub in self.subs.items():
            with tempfile.TemporaryDirectory() as folder:
                sub.save(f"{folder}/cell")
                cells[i] = Path(f"{folder}/cell").read_bytes()
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"next": self.next, "trial_cell": self.trial_cell, "cells": cells}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)  # written by save() above, in this sweep's own folder
        self.next, self.trial_cell = state["next"], state["trial_cell"]
        for i, sub in self.subs.items():
            with tempfile.TemporaryDirectory() as folder:
                Path(f"{folder}/cell").write_bytes(state["cells"][i])
                sub.restore(f"{folder}/cell")


def wave_orders(n_cells: int, per_cell: int, wave_size: int | None) -> list[list[int]]:
    """The cell of every trial, wave by wave: round-robin over the cells, `per_cell` trials each."""
    order = [k % n_cells for k in range(n_cells * per_cell)]
    size = wave_size or len(order)
    return [order[i : i + size] for i in range(0, len(order), size)]


def build_tuner(
    spec: ExperimentSpec,
    spec_data: dict[str, Any],
    *,
    cells: list[Cell],
    order: list[int],
    run_name: str,
    storage_path: str,
    study_path: Path,
    callbacks: list[Any],
    lease_actor: str | None,
) -> Any:
    """One wave: a Tuner running the trials `order` assigns to `cells`."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    s = spec.search
    searcher = CellSearch(
        cells,
        order,
        sampled_space(s.space),
        metric=s.metric,
        mode=s.mode,
        algorithm=s.algorithm,
        storage=study_storage(study_path),
    )
    scheduler = None
    if s.scheduler is not None:
        scheduler = ASHAScheduler(
            time_attr="ft_step",
            metric=s.scheduler.metric or s.metric,
            mode=s.mode,
            max_t=max_finetune_steps(spec),
            grace_period=s.scheduler.grace_period or spec.finetune.eval_every,
            reduction_factor=s.scheduler.reduction_factor,
        )
    concurrent = s.max_concurrent_trials
    if spec.distributed is not None:  # as many trials at once as there are worker groups' worth of resources
        concurrent = concurrent or distributed_slots(spec)
    trainable = make_trainable(spec, spec_data, lease_actor)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=len(order),
            max_concurrent_trials=concurrent,
            reuse_actors=True,  # warm workers keep torch, the base model and the detector loaded
        ),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=storage_path if "://" in storage_path else os.path.abspath(storage_path),
            callbacks=[*callbacks, _json_logger()],
            verbose=0,  # the Progress callback prints one readable line instead of Tune's tables
            # A trial that raised, or whose worker died, runs again (from its last checkpoint, if any).
            failure_config=tune.FailureConfig(max_failures=spec.failure.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )


DRIVER_CPU = 0.25  # what a distributed trial's own process holds while its Ray Train job runs (Tune needs > 0)


def make_trainable(spec: ExperimentSpec, spec_data: dict[str, Any], lease_actor: str | None) -> Any:
    """The Tune trainable of a sweep's trials (the same for a fresh wave and a restored one)."""
    from ray import tune

    from orchestrator.trial import tune_trainable

    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    if spec.distributed is not None:  # the trial's own process only waits: its Ray Train workers hold resources
        resources = {"cpu": DRIVER_CPU, "gpu": 0}
    return tune.with_resources(
        tune.with_parameters(tune_trainable, spec_data=spec_data, lease_actor=lease_actor), resources
    )


def _json_logger() -> Any:
    from ray.tune.logger import JsonLoggerCallback

    return JsonLoggerCallback()


def distributed_slots(spec: ExperimentSpec) -> int:
    """How many distributed trials the connected cluster runs at once (at least one)."""
    import ray

    d, r = spec.distributed, spec.resources
    assert d is not None
    total = ray.cluster_resources()
    fits = [int(total.get("CPU", 0) // (d.workers * r.cpu + DRIVER_CPU))]
    if r.gpu > 0:
        fits.append(int(total.get("GPU", 0) // (d.workers * r.gpu)))
    return max(1, min(fits))


Row = dict[str, Any]
KEPT = ("resurgence", "presence", "presence_erased", "presence_base", "retention", "retention_erased")
KEPT += ("resurgence_proxy", "ft_step", "trial_seconds", "trial_cpu_seconds", "erase_seconds")


class TrialRows(Callback):
    """Keeps one small row per trial on the driver (final metrics, the peak of its resurgence curve, its
    cell's fixed values), so results outlive the wave's Tuner and need no result files read back."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        row = self.rows.setdefault(
            trial.trial_id,
            {"trial": trial.trial_id, "error": False, "config": dict(trial.config), "peak_resurgence": float("nan")},
        )
        row.update({k: result[k] for k in KEPT if k in result})
        r = result.get("resurgence")
        if isinstance(r, int | float) and not r <= row["peak_resurgence"]:  # nan-safe max
            row["peak_resurgence"] = float(r)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.rows.setdefault(trial.trial_id, {"trial": trial.trial_id, "config": dict(trial.config)})["error"] = True

    def take(self) -> list[Row]:
        rows = [{**{k: float("nan") for k in KEPT}, "peak_resurgence": float("nan"), **r} for r in self.rows.values()]
        self.rows = {}
        return rows


class WaveLog:
    """What a sweep's driver writes down as it goes, so another driver can continue it: the waves that
    are done and their rows (`rows.jsonl` in the sweep's folder, one line per trial)."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "rows.jsonl"

    def done(self) -> dict[str, list[Row]]:
        """Rows of the finished waves, by wave name."""
        out: dict[str, list[Row]] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a killed driver: its wave is not done
                    continue
                out.setdefault(record["wave"], []).extend(record["rows"])
        return out

    def record(self, wave: str, rows: list[Row]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"wave": wave, "rows": rows}, default=str) + "\n")


def rows_from_results(grid: Any) -> list[Row]:
    """Rows of a restored wave from Tune's own result files (its trials ran under two drivers)."""
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        peak = float(frame["resurgence"].max()) if frame is not None and "resurgence" in frame else float("nan")
        metrics = result.metrics or {}
        row = {k: float("nan") for k in KEPT} | {k: metrics[k] for k in KEPT if k in metrics}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        rows.append(
            row
            | {"trial": trial_id, "error": result.error is not None, "config": dict(result.config or {})}
            | {"peak_resurgence": peak}
        )
    return rows


# Tune's controller loop on the driver (`TuneController.step`) waits at most 0.1 s for its next event (a
# result, an actor up) and then does its bookkeeping anyway: it asks the searcher, checks the stop conditions
# and the state file's clock, runs every callback. Ten empty rounds a second cost the driver more CPU than
# all the events of a toy trial (benchmarks/bench_sweep.py). An event still ends the wait at once, so a wait
# of up to 1 s thins out only the empty rounds. Ray has no setting for it: the wait is raised in its actor
# manager (ray 2.60, as pyproject.toml pins it), once per process.
TUNE_IDLE_WAIT_S = 1.0
# Tune's experiment state, which `resurgence resume` restores an interrupted wave from: written at the start
# and end of every wave and, by default, every 10 s or more, as often as costs 5% of the driver's time, which
# grows with the wave. Every 60 s here (a driver lost mid-wave reruns at most a minute more of trials);
# TUNE_GLOBAL_CHECKPOINT_S set by the user wins.
TUNE_STATE_EVERY_S = "60"


def calm_tune_loop() -> None:
    """Raise the controller loop's idle wait to TUNE_IDLE_WAIT_S (a timeout of 0, a poll, stays a poll) and
    write the experiment state every TUNE_STATE_EVERY_S seconds unless the user's environment says otherwise."""
    from ray.air.execution._internal.actor_manager import RayActorManager

    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", TUNE_STATE_EVERY_S)
    if getattr(RayActorManager.next, "calmed", False):
        return
    wait_for_event = RayActorManager.next

    def next_event(self: Any, timeout: float | None = None) -> bool:
        if timeout is not None and 0 < timeout < TUNE_IDLE_WAIT_S:
            timeout = TUNE_IDLE_WAIT_S
        return wait_for_event(self, timeout=timeout)

    next_event.calmed = True  # type: ignore[attr-defined]
    RayActorManager.next = next_event


def run_waves(
    spec: ExperimentSpec,
    spec_data: dict[str, Any],
    *,
    cells: list[Cell],
    per_cell: int,
    run_name: str,
    study_path: Path,
    callbacks: list[Any],
    lease_actor: str | None,
    on_wave: Callable[[int, list[Row]], None] | None = None,
    log: WaveLog | None = None,
    on_resumed: Callable[[str, set[str]], None] | None = None,
) -> list[Row]:
    """Run every cell's trials as waves of Tuner runs; returns one small row per trial. With `log`, each
    finished wave is written down, and a sweep continued by another driver skips the finished waves and
    restores the interrupted one from Tune's experiment state (`on_resumed(wave, trial ids)` then cleans up
    after the trials the dead driver had started but Tune had not recorded)."""
    from ray import tune

    # Tune's own per-trial files: JSON results only (the result grid reads them back). Its automatic
    # loggers would add CSV and TensorBoard files too, written by the driver for every result.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    calm_tune_loop()
    rows: list[Row] = []
    collector = TrialRows()
    done = log.done() if log is not None else {}
    orders = wave_orders(len(cells), per_cell, spec.search.wave_size)
    for w, order in enumerate(orders):
        name = key = run_name if len(orders) == 1 else f"{run_name}-wave{w:03d}"
        if key in done:
            rows += done[key]
            continue
        for cb in callbacks:
            if hasattr(cb, "wave"):
                cb.wave = name
        path = experiment_path(spec.storage_path, name)
        tuner, restored, abandoned = None, False, None
        if log is not None and tune.Tuner.can_restore(path):
            print(f"[resume] wave {name}: restoring Tune's experiment state from {path}", flush=True)
            try:
                tuner = tune.Tuner.restore(path, make_trainable(spec, spec_data, lease_actor), resume_errored=True)
                restored = True
                # The restored Tuner comes back with pickled copies of the callbacks from when the wave
                # began; this driver's own callbacks (its MLflow connection, its rows) take their place.
                tuner._local_tuner.get_run_config().callbacks = [collector, *callbacks, _json_logger()]
            except (OSError, ValueError, RuntimeError) as err:  # killed before Tune wrote its state
                print(f"[resume] wave {name}: cannot restore ({err}); running it again", flush=True)
                abandoned, name = name, f"{name}-again"
                for cb in callbacks:
                    if hasattr(cb, "wave"):
                        cb.wave = name
        if tuner is None:
            tuner = build_tuner(
                spec,
                spec_data,
                cells=cells,
                order=order,
                run_name=name,
                storage_path=spec.storage_path,
                study_path=study_path,
                callbacks=[collector, *callbacks],
                lease_actor=lease_actor,
            )
        grid = tuner.fit()
        del tuner  # the wave's trials leave the driver's memory with it
        wave_rows = collector.take()
        if restored:
            wave_rows = rows_from_results(grid)
            if on_resumed is not None:
                on_resumed(name, {r["trial"] for r in wave_rows})
        elif abandoned is not None and on_resumed is not None:
            on_resumed(abandoned, set())  # every run the dead driver started in that wave is an orphan
        del grid
        rows += wave_rows
        if log is not None:
            log.record(key, wave_rows)
        if on_wave is not None:
            on_wave(w, wave_rows)
    return rows


def experiment_path(storage_path: str, name: str) -> str:
    return (
        f"{storage_path.rstrip('/')}/{name}"
        if "://" in storage_path
        else os.path.join(os.path.abspath(storage_path), name)
    )
