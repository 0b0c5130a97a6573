"""The search: an experiment spec becomes waves of Ray Tune runs driven by persistent Optuna studies.

- **Dimensions** map dotted spec paths to distributions. `grid` dimensions (methods, concepts, models,
  ...) split the sweep into *cells*, one per combination; every cell gets its own Optuna study over the
  other dimensions, `search.num_samples` trials each, so one method's results never steer another's.
  `CellSearch` is the Tune searcher that hands out the cells' suggestions round-robin.
- **Waves**: Tune keeps every trial of a run in the driver's memory, so a long sweep runs as a sequence of
  Tuner runs (`search.wave_size` trials each). Each cell's study lives in an Optuna journal file under
  the sweep's folder and is loaded again by the next wave, so the search continues where it was.
- **Slots**: every trial of the budget has a name fixed in advance (`t00007`); when it ends, its row goes
  to the sweep's ledger (orchestrator/ledger.py) before its study is told. A driver that dies at any
  moment leaves the ledger and the studies consistent, and the next driver runs only the missing slots.
- **Early stopping**: ASHA stops unpromising fine-tunes on the scheduler's metric over `ft_step` (the
  fine-tuning step), which can be the cheap `resurgence_proxy` while the searcher learns from the full
  `resurgence` at the end of each trial.
"""

from __future__ import annotations

import itertools
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.search import Searcher

from orchestrator.ledger import RESUME_KEY, SLOT_KEY, Row, TrialLedger
from orchestrator.paths import storage_location
from orchestrator.ray_internals import TRAIN_CHECKPOINT_KEY, raise_tune_idle_wait
from orchestrator.resolved import RESOLVED_KEY, max_finetune_steps, resolve_trial
from orchestrator.spec import Dimension, Experiment, ExperimentSpec


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


def make_sampler(algorithm: str, seed: int, startup: int | None = None) -> Any:
    """The cell's Optuna sampler; `startup`: TPE's random trials before its model (None: Optuna's 10)."""
    import optuna

    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if startup is None:
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)


def study_storage(path: Path) -> Any:
    """A persistent Optuna storage that several Tuner runs (waves) load in turn: a journal file."""
    import optuna

    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


def optuna_distribution(dim: Dimension) -> Any:
    """A sampled dimension as an Optuna distribution (bounds inclusive, as in the spec)."""
    import optuna

    if dim.loguniform is not None:
        return optuna.distributions.FloatDistribution(*dim.loguniform, log=True)
    if dim.uniform is not None:
        return optuna.distributions.FloatDistribution(*dim.uniform)
    if dim.randint is not None:
        return optuna.distributions.IntDistribution(*dim.randint)
    return optuna.distributions.CategoricalDistribution(list(dim.choice or dim.grid or []))


TRIAL_ATTR = "trial"  # an Optuna trial's user attribute: the slot (the sweep's name of the trial) it belongs to
# ... and the one a trial with no slot gets when a later driver closes it: a driver died inside `ask`, between
# Optuna creating the trial and the slot being written on it. It is no trial of the sweep's budget.
ABANDONED_ATTR = "abandoned"


def trial_value(row: Row | None, result: dict | None, metric: str) -> float | None:
    """The value a cell's study is told for a finished trial: the metric of its last result, else the last
    one it reported; None (a failed trial) when it errored or never reported the metric."""
    if row is None or row.get("error"):
        return None
    for source in (result or {}, row):
        v = source.get(metric)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


class CellSearch(Searcher):
    """A Tune searcher over several cells that asks their Optuna studies itself. Trial k of the wave fills
    slot `slots[k]` = (its name, its cell); its sampled values come from the cell's study (`study.ask`, the
    slot written on the Optuna trial). When a trial ends, its row goes to the ledger first and only then
    is its study told, so a dead driver never leaves a study ahead of the ledger.

    A wave continued after its driver died gets only the slots the ledger lacks. A slot whose Optuna trial
    the dead driver had asked for (still running in the study) runs again with the same values and is told
    through that same trial; a slot the ledger has but the study still calls running is told from its row
    now; a running trial with no slot (the driver died inside `ask`) is closed as failed and marked
    `abandoned`. So each slot has exactly one finished Optuna trial, no finished trial is told twice, and the
    trials of a study that are not abandoned are the sweep's trials of that cell.

    Each trial's config carries its `ResolvedTrial` (orchestrator/resolved.py), built here once from the
    experiment and the trial's values: the worker, the MLflow callback and the erase cache all read it."""

    def __init__(
        self,
        experiment: Experiment,
        cells: list[Cell],
        slots: list[tuple[str, int]],
        space: dict[str, Dimension],
        *,
        metric: str,
        mode: str,
        algorithm: str,
        storage: Any,
        ledger: TrialLedger,
        rows: TrialRows,
    ) -> None:
        import optuna

        super().__init__()  # no metric of its own: Tune then does not require it in every result
        self.experiment = experiment
        self.cells = cells
        self.slots = list(slots)
        self.search_metric = metric
        self.ledger = ledger
        self.rows = rows
        self.distributions = {p: optuna_distribution(d) for p, d in space.items()}
        self.studies: dict[int, Any] = {}
        self.replay: dict[str, int] = {}  # slot -> number of the Optuna trial a dead driver asked for it
        direction = "maximize" if mode == "max" else "minimize"
        if self.distributions:
            for i in sorted({cell for _, cell in self.slots}):
                self.studies[i] = optuna.create_study(
                    study_name=cells[i].study,
                    storage=storage,
                    sampler=make_sampler(algorithm, cells[i].seed, experiment.spec.search.startup_trials),
                    direction=direction,
                    load_if_exists=True,
                )
                self._mend(self.studies[i])
        self.next = 0
        self.trial_slot: dict[str, tuple[str, int, dict[str, Any]]] = {}  # Tune trial id -> (slot, cell, config)
        self.asked: dict[str, int] = {}  # Tune trial id -> Optuna trial number

    def _mend(self, study: Any) -> None:
        """Bring a study in line with the ledger after a driver died (see the class docstring)."""
        import optuna

        running = optuna.trial.TrialState.RUNNING
        todo = {slot for slot, _ in self.slots}
        done = self.ledger.done()
        for trial in study.get_trials(deepcopy=False, states=(running,)):
            slot = trial.user_attrs.get(TRIAL_ATTR)
            if slot in done:
                value = trial_value(done[slot], None, self.search_metric)
                tell(study, trial.number, value)
            elif slot in todo and set(trial.params) == set(self.distributions) and slot not in self.replay:
                self.replay[slot] = trial.number
            else:  # begun inside `ask` by a driver that died there: it has no slot
                abandon(study, trial)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True  # the cells carry their own metric, mode and space

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.next >= len(self.slots):
            return Searcher.FINISHED
        slot, i = self.slots[self.next]
        self.next += 1
        params: dict[str, Any] = {}
        if i in self.studies:
            study = self.studies[i]
            if slot in self.replay:
                number = self.replay.pop(slot)
                params = dict(study.get_trials(deepcopy=False)[number].params)
            else:
                trial = study.ask(self.distributions)
                trial.set_user_attr(TRIAL_ATTR, slot)
                number, params = trial.number, dict(trial.params)
            self.asked[trial_id] = number
        config = {**self.cells[i].fixed, **params, SLOT_KEY: slot}
        config[RESOLVED_KEY] = resolve_trial(self.experiment, config, slot)
        checkpoint = self.ledger.checkpoints().get(slot)
        if checkpoint is not None:  # the dead driver's run of this slot saved one: continue from it
            config[RESUME_KEY] = checkpoint
        self.trial_slot[trial_id] = (slot, i, config)
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.trial_slot:
            return
        slot, i, config = self.trial_slot.pop(trial_id)
        row = self.rows.finish(trial_id, error)
        if row is None:  # it never reported
            if result is None and not error:
                return  # stopped before it ever ran (Tune ends a pending trial so): the slot is not done
            row = self.rows.empty(slot, config, error=error) | {k: result[k] for k in KEPT if k in (result or {})}
        self.ledger.record(slot, row)  # first the ledger, then the study
        number = self.asked.pop(trial_id, None)
        if number is not None:
            tell(self.studies[i], number, trial_value(row, result, self.search_metric))

    # Tune snapshots its searcher with its experiment state; a continued sweep reads the ledger instead.
    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"next": self.next}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.next = pickle.load(f)["next"]  # written by save() above, in this sweep's own folder


def trial_finished(study: Any, number: int) -> bool:
    return study.get_trials(deepcopy=False)[number].state.is_finished()


def tell(study: Any, number: int, value: Any) -> None:
    """Tell a study how its trial ended (a value, the values of a multi-objective study, or None: failed),
    unless it knows already."""
    import optuna

    if trial_finished(study, number):
        return
    if value is None:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(number, value)


def abandon(study: Any, trial: Any) -> None:
    """Close a running trial that belongs to no slot or candidate (its driver died inside `ask`): failed, and
    marked abandoned, so that a study's other trials are exactly the sweep's."""
    import optuna

    # Optuna has no public way to get a live Trial of a stored one but its storage id.
    optuna.trial.Trial(study, trial._trial_id).set_user_attr(ABANDONED_ATTR, True)
    tell(study, trial.number, None)


def wave_orders(n_cells: int, per_cell: int, wave_size: int | None) -> list[list[int]]:
    """The cell of every trial, wave by wave: round-robin over the cells, `per_cell` trials each."""
    order = [k % n_cells for k in range(n_cells * per_cell)]
    size = wave_size or len(order)
    return [order[i : i + size] for i in range(0, len(order), size)]


def build_tuner(
    experiment: Experiment,
    *,
    cells: list[Cell],
    slots: list[tuple[str, int]],
    run_name: str,
    storage_path: str,
    study_path: Path,
    callbacks: list[Any],
    lease_actor: str | None,
    ledger: TrialLedger,
    rows: TrialRows,
    trial_fn: Callable[..., None] | None = None,
) -> Any:
    """One wave: a Tuner running the trials of `slots` (name, cell), each slot's trial exactly once.
    `trial_fn`: the function each trial runs (default orchestrator/trainable.py's; the cluster simulation
    passes one that sleeps)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    spec = experiment.spec
    s = spec.search
    searcher = CellSearch(
        experiment,
        cells,
        slots,
        sampled_space(s.space),
        metric=s.metric,
        mode=s.mode,
        algorithm=s.algorithm,
        storage=study_storage(study_path),
        ledger=ledger,
        rows=rows,
    )
    scheduler = None
    if s.scheduler is not None:
        scheduler = ASHAScheduler(
            time_attr="ft_step",
            metric=s.scheduler.metric or s.metric,
            mode=s.mode,
            max_t=max_finetune_steps(experiment),
            grace_period=s.scheduler.grace_period or spec.finetune.eval_every,
            reduction_factor=s.scheduler.reduction_factor,
        )
    concurrent = s.max_concurrent_trials
    if spec.distributed is not None:  # as many trials at once as there are worker groups' worth of resources
        concurrent = concurrent or distributed_slots(spec)
    trainable = make_trainable(spec, lease_actor, trial_fn)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=len(slots),
            max_concurrent_trials=concurrent,
            reuse_actors=True,  # warm workers keep torch, the base model and the detector loaded
        ),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=storage_location(storage_path),
            callbacks=[rows, *callbacks, _json_logger()],
            verbose=0,  # the Progress callback prints one readable line instead of Tune's tables
            # A trial that raised, or whose worker died, runs again (from its last checkpoint, if any).
            failure_config=tune.FailureConfig(max_failures=spec.failure.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        ),
    )


DRIVER_CPU = 0.25  # what a distributed trial's own process holds while its Ray Train job runs (Tune needs > 0)


def make_trainable(spec: ExperimentSpec, lease_actor: str | None, trial_fn: Callable[..., None] | None = None) -> Any:
    """The Tune trainable of a sweep's trials (the same for a fresh wave and a restored one)."""
    from ray import tune

    from orchestrator.trainable import tune_trainable

    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    if spec.distributed is not None:  # the trial's own process only waits: its Ray Train workers hold resources
        resources = {"cpu": DRIVER_CPU, "gpu": 0}
    fn = trial_fn or tune_trainable
    return tune.with_resources(tune.with_parameters(fn, lease_actor=lease_actor), resources)


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


KEPT = ("resurgence", "presence", "presence_erased", "presence_base", "retention", "retention_erased")
KEPT += ("resurgence_proxy", "ft_step", "trial_seconds", "trial_cpu_seconds", "erase_seconds", "presence_images")
KEPT += ("presence_lo", "presence_hi", "resurgence_lo", "resurgence_hi", "clip_score_erased")


class TrialRows(Callback):
    """Keeps one small row per running trial on the driver (final metrics, the peak of its resurgence
    curve, its config); the searcher takes a trial's row when it ends and writes it to the ledger, so
    results outlive the wave's Tuner and its driver. Checkpoints trials save go to the ledger as well."""

    def __init__(self, ledger: TrialLedger, storage_path: str) -> None:
        self.rows: dict[str, Row] = {}
        self.ledger = ledger
        self.scheme = storage_path.split("://")[0] + "://" if "://" in storage_path else ""

    def empty(self, slot: str, config: dict[str, Any] | None = None, error: bool = False) -> Row:
        """A row with nothing reported yet."""
        return {
            **{k: float("nan") for k in KEPT},
            "trial": slot,
            "error": error,
            "config": {k: v for k, v in (config or {}).items() if k != RESOLVED_KEY},  # the values, as JSON
            "peak_resurgence": float("nan"),
        }

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        row = self.rows.get(trial.trial_id)
        if row is None:
            row = self.rows[trial.trial_id] = self.empty(trial.config.get(SLOT_KEY, trial.trial_id), trial.config)
        row.update({k: result[k] for k in KEPT if k in result})
        if "erase_cache" in result:  # where its erased model came from: miss, hit or memo
            row["erase_cache"] = str(result["erase_cache"])
        # A distributed trial's Ray Train job reports its checkpoints as a path among the metrics (Ray's
        # TuneReportCallback), not as a Tune checkpoint.
        path = result.get(TRAIN_CHECKPOINT_KEY)
        slot = trial.config.get(SLOT_KEY)
        if isinstance(path, str) and slot is not None and self.ledger.checkpoints().get(slot) != self.scheme + path:
            self.ledger.checkpoint(slot, self.scheme + path)
        r = result.get("resurgence")
        if isinstance(r, int | float) and not r <= row["peak_resurgence"]:  # nan-safe max
            row["peak_resurgence"] = float(r)

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        slot = trial.config.get(SLOT_KEY)
        if slot is not None:
            self.ledger.checkpoint(slot, self.scheme + checkpoint.path)

    def finish(self, trial_id: str, error: bool) -> Row | None:
        """The row of a trial that ended (None if it never reported)."""
        row = self.rows.pop(trial_id, None)
        if row is not None:
            row["error"] = bool(error)
        return row


# Tune's controller loop on the driver (`TuneController.step`) waits at most 0.1 s for its next event (a
# result, an actor up) and then does its bookkeeping anyway: it asks the searcher, checks the stop conditions
# and the state file's clock, runs every callback. Ten empty rounds a second cost the driver more CPU than
# all the events of a toy trial (benchmarks/bench_sweep.py). An event still ends the wait at once, so a wait
# of up to 1 s thins out only the empty rounds. Ray has no setting for it (orchestrator/ray_internals.py).
TUNE_IDLE_WAIT_S = 1.0
# Tune's experiment state (its own snapshot of a wave) is written at the start and end of every wave and, by
# default, every 10 s or more, as often as costs 5% of the driver's time, which grows with the wave. A sweep
# continued after its driver died does not read it (the ledger says what is done, orchestrator/ledger.py):
# every 60 s here; TUNE_GLOBAL_CHECKPOINT_S set by the user wins.
TUNE_STATE_EVERY_S = "60"


def calm_tune_loop() -> None:
    """Raise the controller loop's idle wait to TUNE_IDLE_WAIT_S (a timeout of 0, a poll, stays a poll) and
    write the experiment state every TUNE_STATE_EVERY_S seconds unless the user's environment says otherwise."""
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", TUNE_STATE_EVERY_S)
    raise_tune_idle_wait(TUNE_IDLE_WAIT_S)


def run_waves(
    experiment: Experiment,
    *,
    cells: list[Cell],
    per_cell: int,
    run_name: str,
    study_path: Path,
    callbacks: list[Any],
    lease_actor: str | None,
    ledger: TrialLedger,
    on_wave: Callable[[int, list[Row]], None] | None = None,
    slot_prefix: str = "",
    trial_fn: Callable[..., None] | None = None,
) -> list[Row]:
    """Run every cell's trials as waves of Tuner runs; returns one small row per trial (from the ledger).
    Trial k of the sweep fills slot `{slot_prefix}t{k:05d}`; a slot the ledger holds is done and is not run
    again, so a sweep continued by another driver runs only what its dead driver had not finished."""
    # Tune's own per-trial files: JSON results only. Its automatic loggers would add CSV and TensorBoard
    # files too, written by the driver for every result.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    calm_tune_loop()
    spec = experiment.spec
    rows: list[Row] = []
    done = ledger.done()
    orders = wave_orders(len(cells), per_cell, spec.search.wave_size)
    k = 0
    for w, order in enumerate(orders):
        name = run_name if len(orders) == 1 else f"{run_name}-wave{w:03d}"
        slots = [(f"{slot_prefix}t{k + j:05d}", cell) for j, cell in enumerate(order)]
        k += len(order)
        todo = [(slot, cell) for slot, cell in slots if slot not in done]
        if todo:
            if len(todo) < len(slots):
                line = f"{len(slots) - len(todo)} of {len(slots)} trials done; running the other {len(todo)}"
                print(f"[resume] wave {name}: {line}", flush=True)
            for cb in callbacks:
                if hasattr(cb, "wave"):
                    cb.wave = name
            collector = TrialRows(ledger, spec.storage_path)
            tuner = build_tuner(
                experiment,
                cells=cells,
                slots=todo,
                run_name=name,
                storage_path=spec.storage_path,
                study_path=study_path,
                callbacks=callbacks,
                lease_actor=lease_actor,
                ledger=ledger,
                rows=collector,
                trial_fn=trial_fn,
            )
            tuner.fit()
            del tuner  # the wave's trials leave the driver's memory with it
            missing = [slot for slot, _ in todo if slot not in done]
            if missing:  # Tune ended the wave without running them: the sweep is not done (resumable)
                raise RuntimeError(f"wave {name} ended with {len(missing)} trial(s) not run: {', '.join(missing[:5])}")
        wave_rows = [done[slot] for slot, _ in slots]
        rows += wave_rows
        if todo and on_wave is not None:
            on_wave(w, wave_rows)
    return rows
