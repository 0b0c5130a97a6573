"""A sweep on the driver: the attacker search, or the defender search around it, with MLflow bookkeeping.

Attacker (`run_attack`): every grid cell's Optuna study (search.py) is run in waves; one MLflow parent
run per sweep, one child run per trial.

Defender (`run_defense`): Ray Tune does not nest Tuners, so the outer search is an Optuna study of its
own (a journal file under the sweep's folder, so it survives the driver) asked for `per_wave` candidates
at a time. Each wave is one attacker sweep whose cells are the candidates (each with its fixed erasure
settings and its own attacker study, `search.num_samples` trials: the fixed attack budget). A
candidate's score is the worst resurgence any of its attacks reached (the peak of the curve: an
attacker may stop fine-tuning whenever it likes); its utility is the retention right after erasure. The
outer study is told both, then asked for the next wave. MLflow: a `defense` parent run, one
`defender-candidate` child per candidate, the attack trials under their candidate's run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.candidates import Candidate, best_candidate, best_line, print_candidates
from orchestrator.formatting import finite
from orchestrator.ledger import TrialLedger
from orchestrator.resume import (
    DriverLock,
    SweepState,
    continue_trial_runs,
    left_runs,
    new_metrics,
    reopen_parent,
    spec_hash,
)
from orchestrator.search import (
    Cell,
    Row,
    grid_cells,
    optuna_distribution,
    run_waves,
    study_storage,
    tell,
    trial_finished,
)
from orchestrator.spec import ExperimentSpec
from orchestrator.tracking import MlflowTrials, Progress, Tracker, flatten, redact

Opening = Future  # of (Tracker, parent run id)


def sweep_dir(spec: ExperimentSpec, run_name: str) -> Path:
    """The sweep's own folder on the driver (its spec copy, the Optuna journals)."""
    base = spec.storage_path if "://" not in spec.storage_path else spec.cache_dir
    return Path(base) / run_name


def open_parent(
    uri: str,
    spec: ExperimentSpec,
    data: dict[str, Any],
    run_name: str,
    tags: dict[str, str],
    stage: str,
    spec_file: str,
    look_first: bool = False,
) -> tuple[Tracker, str]:
    """The MLflow experiment and the sweep's parent run (creating a fresh SQLite store takes seconds);
    `look_first`: a parent run of this sweep that a dead driver made is taken up again."""
    tracker = Tracker(uri, spec.name, wal=sweep_dir(spec, run_name) / "mlflow.wal")
    sweep_tags = {**tags, "stage": stage, "method": spec.erase.method, "concept": spec.concept.name}
    sweep_tags["model"] = spec.model.name
    found = []
    if look_first:
        tracker.flush()
        found = tracker.client.search_runs(
            [tracker.experiment_id], f"tags.sweep = '{run_name}' and tags.stage = '{stage}'", max_results=1
        )
    if found:
        parent = found[0].info.run_id
        tracker.client.update_run(parent, status="RUNNING")
    else:
        parent = tracker.start_run(run_name, sweep_tags)
    params = {"search": data.get("search", {}), "spec": os.path.basename(spec_file)}
    if data.get("defender"):
        params["defender"] = data["defender"]
    tracker.log(parent, params=redact(flatten(params)))
    tracker.artifact(parent, sweep_dir(spec, run_name) / "experiment.yaml")  # written by run_sweep
    return tracker, parent


def attacker_cells(spec: ExperimentSpec, prefix: str, fixed: dict[str, Any] | None = None) -> list[Cell]:
    return [
        Cell({**(fixed or {}), **grid}, study=f"{prefix}-cell{j}", seed=spec.search.seed + j)
        for j, grid in enumerate(grid_cells(spec.search.space))
    ]


def run_attack(
    spec: ExperimentSpec,
    data: dict[str, Any],
    opening: Opening,
    run_name: str,
    tags: dict[str, str],
    lease: str | None,
    on_wave: Callable[[int, list[Row]], None] | None = None,
    resumed: bool = False,
) -> list[Row]:
    cells = attacker_cells(spec, run_name)
    total = len(cells) * spec.search.num_samples
    folder = sweep_dir(spec, run_name)
    ledger = TrialLedger(folder)
    existing = continue_trial_runs(opening.result()[0], run_name, ledger) if resumed else {}
    callback = MlflowTrials(opening.result, data, tags, existing=existing)
    progress = Progress(total, spec.search.metric, spec.search.mode, ended=ledger.done().values())
    rows = run_waves(
        spec,
        data,
        cells=cells,
        per_cell=spec.search.num_samples,
        run_name=run_name,
        study_path=folder / "optuna.journal",
        callbacks=[callback, progress],
        lease_actor=lease,
        ledger=ledger,
        on_wave=on_wave,
    )
    tracker, parent = opening.result()
    log_summary(tracker, parent, rows, spec, resumed)
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
    return dict(tracker.client.get_run(tracker.run_id(run_id) or run_id).data.metrics)


@dataclass
class Outcome:
    rows: list[Row]  # one per trial
    run_name: str
    parent: str  # the MLflow parent run
    tracker: Tracker  # closed; its write statistics stay readable
    report: Path | None  # the HTML page, when the sweep had a finished trial
    ok: bool  # at least one trial finished


def run_sweep(
    spec: ExperimentSpec,
    data: dict[str, Any],
    uri: str,
    spec_file: str,
    *,
    on_wave: Callable[[int, list[Row]], None] | None = None,
    write_html: bool = True,
    resume: SweepState | None = None,
    one_node: bool = False,
) -> Outcome:
    """The whole sweep on a connected Ray: the lease actor, the parent run, the attacker or defender
    search, the summary metrics and the report; the parent run ends FINISHED when a trial finished.
    `resume`: continue a sweep whose driver died (its state file, its ledger, its MLflow runs and studies).
    `one_node`: this Ray is one machine's alone (the local Ray `resurgence run` starts): the erase cache's
    leases are lock files on its disk, not an actor (an idle Ray worker costs about 1.3% of a core: it
    wakes every 10 ms to check for signals)."""
    from orchestrator.cache import start_lease_actor
    from orchestrator.tracking import git_sha, version_tags

    run_name = resume.run_name if resume else f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = sweep_dir(spec, run_name)
    folder.mkdir(parents=True, exist_ok=True)
    lock = DriverLock(folder)  # one driver per sweep; a dead driver's lock goes with its process
    state = resume or SweepState(run_name, spec_file, uri, None, spec_hash(data), "running", time.strftime("%c"))
    state.status = "running"
    state.save(folder)
    if resume is None:  # the spec as run (overrides applied): logged (secrets out), and kept for a resume
        (folder / "experiment.yaml").write_text(yaml.safe_dump(redacted_spec(data), sort_keys=False))
        (folder / "spec.json").write_text(json.dumps(data))
    tags = {"git_sha": git_sha(), "sweep": run_name, **version_tags()}
    stage = "defense" if spec.defender is not None else "sweep"
    import ray

    res = ray.cluster_resources()
    print(f"Ray: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs; sweep {run_name}", flush=True)
    # One producer per erased model, across the whole sweep: a lease actor that every node's trials ask,
    # or (one_node) lock files in the cache's local folder.
    lease = None if one_node else f"erase-leases-{run_name}"
    lease_actor = None if lease is None else start_lease_actor(lease)
    # MLflow's set-up (seconds for a fresh SQLite store) overlaps Tune's start of the first trial actors,
    # which import torch and diffusers in their own processes; the callbacks wait for it on first use.
    pool = ThreadPoolExecutor(max_workers=1)
    if resume is not None and resume.parent:
        opening = pool.submit(reopen_parent, uri, spec.name, resume.parent, folder)
    else:  # a driver that died before it wrote down its parent run may have made it: open_parent finds it
        opening = pool.submit(open_parent, uri, spec, data, run_name, tags, stage, spec_file, resume is not None)
    pool.shutdown(wait=False)
    status, ended = "FAILED", False
    try:
        state.parent = opening.result()[1]
        state.save(folder)
        run = run_defense if spec.defender is not None else run_attack
        rows = run(spec, data, opening, run_name, tags, lease, on_wave, resume is not None)
        tracker, parent = opening.result()
        ok = any(not r["error"] for r in rows)
        index = None
        if ok and write_html:
            from orchestrator.report import write_report

            tracker.flush()  # the report reads the runs back
            index = write_report(uri, spec.name, Path.cwd() / "reports" / run_name, sweep=run_name)
        status = "FINISHED" if ok else "FAILED"
        ended = True
        return Outcome(rows, run_name, parent, tracker, index, ok)
    finally:
        if lease_actor is not None:
            ray.kill(lease_actor)
        if opening.exception() is None:
            tracker, parent = opening.result()
            tracker.end(parent, status)
            if not tracker.close():
                ended = False  # writes wait in the log: `resurgence resume` replays them
        # A sweep that did not reach its end (an error, Ctrl-C, `ray job stop`) stays "running": resumable.
        state.status = status.lower() if ended else "running"
        state.save(folder)
        lock.release()
        if not ended:
            print(f"resurgence: sweep {run_name} stopped before its end; `resurgence resume` continues it", flush=True)


def redacted_spec(data: dict[str, Any]) -> dict[str, Any]:
    """The spec with any value that names or holds a secret replaced (it is logged as an artifact)."""
    from orchestrator.tracking import SECRET_KEY, secret_values

    secrets = secret_values()

    def clean(node: Any, key: str = "") -> Any:
        if isinstance(node, dict):
            return {k: clean(v, str(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [clean(v, key) for v in node]
        if isinstance(node, str) and (SECRET_KEY.search(key) or any(s in node for s in secrets)):
            return "[redacted]"
        return node

    return clean(data)


# -- the defender --------------------------------------------------------------------------------------
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


def candidate_score(rows: list[Row]) -> tuple[float, float]:
    """(worst resurgence any attack reached, retention after erasure) of one candidate's attack trials."""
    peaks = [r["peak_resurgence"] for r in rows if finite(r.get("peak_resurgence"))]
    retention = next((r["retention_erased"] for r in rows if finite(r.get("retention_erased"))), math.nan)
    return (max(peaks) if peaks else math.nan), retention


CANDIDATE_ATTR = "candidate"  # a defender study trial's user attribute: the candidate number it is


def run_defense(
    spec: ExperimentSpec,
    data: dict[str, Any],
    opening: Opening,
    run_name: str,
    tags: dict[str, str],
    lease: str | None,
    on_wave: Callable[[int, list[Row]], None] | None = None,
    resumed: bool = False,
) -> list[Row]:
    """The defender's waves. Candidate c of wave i is the defender study's trial with user attribute
    candidate = c; its attacks fill the ledger's slots `d{i:03d}-t...`. A continued sweep walks the same
    waves: a candidate the dead driver had asked for is taken from the study (not asked again), its MLflow
    run found by its tag, its attacks run only where the ledger lacks them; a candidate the study already
    knows the outcome of is not told again, and its run is closed if its driver had not."""
    d = spec.defender
    assert d is not None
    folder = sweep_dir(spec, run_name)
    ledger = TrialLedger(folder)
    study = defender_study(spec, folder / "defender.journal", f"{run_name}-defender")
    distributions = {path: optuna_distribution(dim) for path, dim in d.space.items()}
    n_cells = len(grid_cells(spec.search.space))
    total = d.candidates * n_cells * spec.search.num_samples
    tracker, parent = opening.result()
    existing = continue_trial_runs(tracker, run_name, ledger) if resumed else {}
    known = left_runs(tracker, run_name, "defender-candidate", "candidate") if resumed else {}
    asked_before = mend_defender_study(study, set(distributions))
    parents: dict[Any, str] = {}
    callback = MlflowTrials(opening.result, data, tags, parents=parents, existing=existing)
    progress = Progress(total, spec.search.metric, spec.search.mode, ended=ledger.done().values())
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
                    f"candidate-{c}", {**tags, "stage": "defender-candidate", "candidate": str(c)}, parent=parent
                )
                tracker.log(parents[c], params={f"defender.{p}": str(v) for p, v in trial.params.items()})
            cells += attacker_cells(spec, f"{run_name}-c{c}", fixed={**trial.params, "_candidate": c})
        rows = run_waves(
            spec,
            data,
            cells=cells,
            per_cell=spec.search.num_samples,
            run_name=f"{run_name}-d{wave:03d}",
            study_path=folder / "optuna.journal",
            callbacks=[callback, progress],
            lease_actor=lease,
            ledger=ledger,
            on_wave=on_wave,
            slot_prefix=f"d{wave:03d}-",
        )
        all_rows += rows
        for c, trial in wave_candidates:
            worst, retention = candidate_score([r for r in rows if r["config"].get("_candidate") == c])
            feasible = finite(retention) and retention >= d.retention_floor
            ok = finite(worst) and finite(retention)
            candidates.append(
                Candidate(c, parents[c], dict(trial.params), worst, retention, feasible, "FINISHED" if ok else "FAILED")
            )
            # The study first, then MLflow: a driver that dies in between leaves a told trial and an open
            # run, which the next one closes (a told trial is never told again).
            if not trial_finished(study, trial.number):
                if ok:  # Optuna's constraint convention (both samplers read it): <= 0 is feasible
                    trial.set_constraint("retention_floor", d.retention_floor - retention)
                tell(study, trial.number, ([worst, retention] if d.objective == "pareto" else worst) if ok else None)
            left = known.get(str(c))
            if left is None or left.status == "RUNNING":
                metrics = [("worst_resurgence", worst, 0), ("retention", retention, 0)]
                metrics.append(("feasible", float(feasible), 0))
                tracker.log(parents[c], metrics=new_metrics(left.metrics, metrics) if left else metrics)
                tracker.end(parents[c], "FINISHED" if ok else "FAILED")
        number += k
        wave += 1
        print(f"[defender] {number}/{d.candidates} candidates attacked; " + best_line(candidates), flush=True)
    log_summary(tracker, parent, all_rows, spec, resumed)
    best = best_candidate(candidates)
    if best is not None:
        metrics = [("best_worst_resurgence", best.worst_resurgence, 0), ("best_retention", best.retention, 0)]
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
    as failed."""
    import optuna

    by_candidate: dict[int, Any] = {}
    for frozen in study.get_trials(deepcopy=False):
        c = frozen.user_attrs.get(CANDIDATE_ATTR)
        if c is not None and set(frozen.params) == space:
            # Optuna has no public way to get a live Trial of a stored one but its storage id.
            by_candidate[int(c)] = optuna.trial.Trial(study, frozen._trial_id)
        elif not frozen.state.is_finished():
            tell(study, frozen.number, None)
    return by_candidate


# -- summaries -------------------------------------------------------------------------------------------
def rank(rows: list[Row], spec: ExperimentSpec) -> list[Row]:
    """Best first; trials without the metric after, errors last."""
    sign = -1 if spec.search.mode == "max" else 1
    metric = spec.search.metric
    return sorted(
        rows,
        key=lambda r: (r["error"], not finite(r.get(metric)), sign * r[metric] if finite(r.get(metric)) else 0.0),
    )
