"""The defender: which erasure settings (say, meta-unlearning weights) keep a concept erased against the strongest
fine-tuning an attacker finds?

Ray Tune does not nest Tuners, so the outer search is an Optuna study of its own (a journal file under the
sweep's folder, so it survives the driver) asked for `per_wave` candidates at a time. Each wave is one attacker
sweep whose cells are the candidates (each with its fixed erasure settings and its own attacker study,
`search.num_samples` trials: the fixed attack budget). A candidate's score is the worst case over its attacks
(`defender.score`): by default the highest presence of the concept any attack reached (presence after erasure +
the peak of its resurgence curve: an attacker may stop fine-tuning whenever it likes), or the highest
resurgence; its utility is the retention right after erasure. The outer study is told both, then asked for
the next wave. MLflow: a `defense` parent run, one `defender-candidate` child per candidate, the attack trials
under their candidate's run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from orchestrator.attack import SearchRun, attacker_cells, log_summary, logged_metrics
from orchestrator.candidates import Candidate, best_candidate, best_line, print_candidates
from orchestrator.formatting import finite
from orchestrator.resume import left_runs, new_metrics
from orchestrator.search import (
    Cell,
    Row,
    abandon,
    grid_cells,
    optuna_distribution,
    study_storage,
    tell,
    trial_finished,
)
from orchestrator.spec import ExperimentSpec


def defender_study(spec: ExperimentSpec, path: Path, name: str) -> Any:
    import optuna

    d = spec.defender
    assert d is not None
    if d.objective == "pareto":
        sampler = optuna.samplers.NSGAIISampler(seed=d.seed, population_size=max(2, d.per_wave))
        return optuna.create_study(
            study_name=name,
            storage=study_storage(path),
            sampler=sampler,
            directions=["minimize", "maximize"],
            load_if_exists=True,
        )
    sampler = optuna.samplers.TPESampler(seed=d.seed, n_startup_trials=max(2, d.per_wave))
    return optuna.create_study(
        study_name=name, storage=study_storage(path), sampler=sampler, direction="minimize", load_if_exists=True
    )


def presence_reached(row: Row) -> float:
    """The concept's presence at an attack's strongest moment: presence after erasure + its peak resurgence."""
    return row["peak_resurgence"] + row["presence_erased"]


def candidate_score(rows: list[Row], utility: str = "retention") -> tuple[float, float, float]:
    """(worst presence, worst resurgence any attack reached, `utility` right after erasure) of one candidate's
    attack trials (`presence_reached` of each)."""
    peaks = [r["peak_resurgence"] for r in rows if finite(r.get("peak_resurgence"))]
    reached = [presence_reached(r) for r in rows if finite(r.get("peak_resurgence"))]
    key = f"{utility}_erased"
    retention = next((r[key] for r in rows if finite(r.get(key))), math.nan)
    worst = max(peaks) if peaks else math.nan
    return (max(reached) if reached and all(map(finite, reached)) else math.nan), worst, retention


CANDIDATE_ATTR = "candidate"  # a defender study trial's user attribute: the candidate number it is


def run_defense(run: SearchRun) -> list[Row]:
    """The defender's waves. Candidate c of wave i is the defender study's trial with user attribute
    candidate = c; its attacks fill the ledger's slots `d{i:03d}-t...`. A continued sweep walks the same
    waves: a candidate the dead driver had asked for is taken from the study (not asked again), its MLflow
    run found by its tag, its attacks run only where the ledger lacks them; a candidate the study already
    knows the outcome of is not told again, and its run is closed if its driver had not."""
    spec, run_name, tags, resumed = run.spec, run.run_name, run.tags, run.resumed
    d = spec.defender
    assert d is not None
    study = defender_study(spec, run.folder / "defender.journal", f"{run_name}-defender")
    distributions = {path: optuna_distribution(dim) for path, dim in d.space.items()}
    total = d.candidates * len(grid_cells(spec.search.space)) * spec.search.num_samples
    parents: dict[Any, str] = {}  # candidate number -> its MLflow run (filled wave by wave)
    ledger, callbacks = run.bookkeeping(total, parents)
    tracker, parent = run.opening.result()
    known = left_runs(tracker, run_name, "defender-candidate", "candidate") if resumed else {}
    asked_before = mend_defender_study(study, set(distributions))
    candidates: list[Candidate] = []
    all_rows: list[Row] = []
    number = wave = 0
    while number < d.candidates:
        k = min(d.per_wave, d.candidates - number)
        wave_candidates: list[tuple[int, Any]] = []  # (candidate, its optuna trial)
        cells: list[Cell] = []
        for c in range(number, number + k):
            trial = asked_before.get(c)
            if trial is None:
                trial = study.ask(distributions)
                trial.set_user_attr(CANDIDATE_ATTR, c)
            wave_candidates.append((c, trial))
            if str(c) in known:
                parents[c] = known[str(c)].run_id
            else:
                parents[c] = tracker.start_run_later(
                    f"candidate-{c}",
                    {
                        **tags,
                        "stage": "defender-candidate",
                        "candidate": str(c),
                        "score": d.score,
                        "utility": d.utility,
                    },
                    parent=parent,
                )
                tracker.log(parents[c], params={f"defender.{p}": str(v) for p, v in trial.params.items()})
            cells += attacker_cells(spec, f"{run_name}-c{c}", fixed={**trial.params, "_candidate": c})
        rows = run.waves(cells, f"{run_name}-d{wave:03d}", ledger, callbacks, slot_prefix=f"d{wave:03d}-")
        all_rows += rows
        for c, trial in wave_candidates:
            presence, resurgence, retention = candidate_score(
                [r for r in rows if r["config"].get("_candidate") == c], d.utility
            )
            worst = presence if d.score == "presence" else resurgence
            feasible = finite(retention) and retention >= d.retention_floor
            ok = finite(worst) and finite(retention)
            candidates.append(
                Candidate(
                    c,
                    parents[c],
                    dict(trial.params),
                    worst,
                    retention,
                    feasible,
                    "FINISHED" if ok else "FAILED",
                    d.score,
                    d.utility,
                )
            )
            # The study first, then MLflow: a driver that dies in between leaves a told trial and an open
            # run, which the next one closes (a told trial is never told again).
            if not trial_finished(study, trial.number):
                if ok:  # Optuna's constraint convention (both samplers read it): <= 0 is feasible
                    trial.set_constraint("retention_floor", d.retention_floor - retention)
                tell(study, trial.number, ([worst, retention] if d.objective == "pareto" else worst) if ok else None)
            left = known.get(str(c))
            if left is None or left.status == "RUNNING":
                metrics = [("worst_presence", presence, 0), ("worst_resurgence", resurgence, 0)]
                metrics += [("retention", retention, 0), ("feasible", float(feasible), 0)]
                tracker.log(parents[c], metrics=new_metrics(left.metrics, metrics) if left else metrics)
                tracker.end(parents[c], "FINISHED" if ok else "FAILED")
        number += k
        wave += 1
        print(f"[defender] {number}/{d.candidates} candidates attacked; " + best_line(candidates), flush=True)
    log_summary(tracker, parent, all_rows, spec, resumed)
    best = best_candidate(candidates)
    if best is not None:
        metrics = [(f"best_worst_{d.score}", best.worst, 0), ("best_retention", best.retention, 0)]
        tracker.log(
            parent,
            params={f"best.{p}": str(v) for p, v in best.params.items()} | {"best.candidate": str(best.number)},
            metrics=new_metrics(logged_metrics(tracker, parent), metrics) if resumed else metrics,
        )
    print_candidates(candidates, d.objective)
    return all_rows


def mend_defender_study(study: Any, space: set[str]) -> dict[int, Any]:
    """The defender study's trials by candidate number, as `optuna.Trial`s (a dead driver's asked candidates
    are taken up again); a trial left running with no candidate (its driver died inside `ask`) is closed
    as failed and marked abandoned, as a cell's study does (orchestrator/search.py)."""
    import optuna

    by_candidate: dict[int, Any] = {}
    for frozen in study.get_trials(deepcopy=False):
        c = frozen.user_attrs.get(CANDIDATE_ATTR)
        if c is not None and set(frozen.params) == space:
            # Optuna has no public way to get a live Trial of a stored one but its storage id.
            by_candidate[int(c)] = optuna.trial.Trial(study, frozen._trial_id)
        elif not frozen.state.is_finished():
            abandon(study, frozen)
    return by_candidate
