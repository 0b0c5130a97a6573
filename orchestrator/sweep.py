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

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.search import Cell, Row, WaveLog, grid_cells, run_waves, study_storage
from orchestrator.spec import Dimension, ExperimentSpec, SpecError
from orchestrator.tracking import MlflowTrials, Progress, Tracker, finite, flatten, redact

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
) -> tuple[Tracker, str]:
    """The MLflow experiment and the sweep's parent run (creating a fresh SQLite store takes seconds)."""
    tracker = Tracker(uri, spec.name, wal=sweep_dir(spec, run_name) / "mlflow.wal")
    sweep_tags = {**tags, "stage": stage, "method": spec.erase.method, "concept": spec.concept.name}
    sweep_tags["model"] = spec.model.name
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
    study_path = folder / "optuna.journal"
    existing = existing_trial_runs(opening.result()[0], run_name) if resumed else {}
    callback = MlflowTrials(opening.result, data, tags, existing=existing)
    progress = Progress(total, spec.search.metric, spec.search.mode)

    def on_resumed(wave: str, trial_ids: set[str]) -> None:
        forget_orphans(opening.result()[0], run_name, wave, trial_ids, study_path)

    rows = run_waves(
        spec,
        data,
        cells=cells,
        per_cell=spec.search.num_samples,
        run_name=run_name,
        study_path=study_path,
        callbacks=[callback, progress],
        lease_actor=lease,
        on_wave=on_wave,
        log=WaveLog(folder),
        on_resumed=on_resumed,
    )
    tracker, parent = opening.result()
    log_summary(tracker, parent, rows, spec, callback)
    return rows


def log_summary(tracker: Tracker, parent: str, rows: list[Row], spec: ExperimentSpec, callback: MlflowTrials) -> None:
    ok = [r for r in rows if not r["error"]]
    best = rank(rows, spec)[0] if ok else None
    metrics = [("trials_completed", len(ok), 0), ("trials_failed", len(rows) - len(ok), 0)]
    metrics += [(f"erase_cache_{k}", v, 0) for k, v in callback.cache_counts.items()]
    if best is not None and finite(best[spec.search.metric]):
        metrics.append((f"best_{spec.search.metric}", best[spec.search.metric], 0))
    tracker.log(parent, metrics=metrics)


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
    `resume`: continue a sweep whose driver died (its state file, its MLflow runs, Tune's experiment state).
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
        opening = pool.submit(reopen_parent, uri, spec, resume.parent, folder)
    else:
        opening = pool.submit(open_parent, uri, spec, data, run_name, tags, stage, spec_file)
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


@dataclass
class SweepState:
    """`sweep.json` in the sweep's folder: what another driver needs to continue it."""

    run_name: str
    spec_file: str
    tracking_uri: str
    parent: str | None  # the MLflow parent run
    spec_hash: str  # of the spec as run (overrides applied): re-running the same command finds it
    status: str  # running, finished or failed
    started: str

    def save(self, folder: Path) -> None:
        tmp = folder / "sweep.json.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        tmp.replace(folder / "sweep.json")

    @classmethod
    def load(cls, folder: Path) -> SweepState:
        return cls(**json.loads((folder / "sweep.json").read_text()))


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


def spec_hash(data: dict[str, Any]) -> str:
    """What identifies a sweep's spec when the same command is run again. Its folders are left out: they are
    absolute paths by then, and a relative `cache_dir` resolves under the job's working directory, which
    `ray job submit` unpacks into a new Ray session's folder after the head node is replaced."""
    kept = {k: v for k, v in data.items() if k not in ("storage_path", "cache_dir")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DriverLock:
    """An exclusive lock on the sweep's folder while its driver lives (flock: the kernel drops it when the
    process dies, even by SIGKILL), so a sweep is continued only when its driver is gone."""

    def __init__(self, folder: Path) -> None:
        import fcntl

        self.fd = os.open(folder / "driver.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise SpecError(f"sweep {folder.name}: another driver is running it") from None

    def release(self) -> None:
        os.close(self.fd)

    @staticmethod
    def held(folder: Path) -> bool:
        import fcntl

        if not (folder / "driver.lock").exists():
            return False
        fd = os.open(folder / "driver.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


def unfinished_sweeps(base: Path, data: dict[str, Any] | None = None) -> list[Path]:
    """Sweep folders under `base` whose driver died before the end (newest first); with `data`, only
    those of this very spec."""
    found = []
    for state_file in base.glob("*/sweep.json"):
        try:
            state = SweepState.load(state_file.parent)
        except (OSError, ValueError, TypeError):
            continue
        if state.status != "running" or DriverLock.held(state_file.parent):
            continue
        if data is not None and state.spec_hash != spec_hash(data):
            continue
        found.append(state_file.parent)
    return sorted(found, key=lambda f: f.stat().st_mtime, reverse=True)


def reopen_parent(uri: str, spec: ExperimentSpec, parent: str, folder: Path) -> tuple[Tracker, str]:
    """The parent run of a sweep another driver started: RUNNING again, and its unwritten writes replayed."""
    tracker = Tracker(uri, spec.name, wal=folder / "mlflow.wal")
    tracker.client.update_run(parent, status="RUNNING")
    return tracker, parent


def existing_trial_runs(tracker: Tracker, run_name: str) -> dict[str, tuple[str, int]]:
    """The trial runs of a sweep in MLflow: trial id -> (run id, last ft_step logged). The writes an earlier
    driver left in the write-ahead log go in first: a trial run it had queued but not written would
    otherwise be missed here, made again for the same trial, and then replayed as a second run."""
    if not tracker.flush(600):
        raise RuntimeError("MLflow stayed unreachable for 600 s; the sweep cannot be continued without it")
    out: dict[str, tuple[str, int]] = {}
    token = None
    while True:
        page = tracker.client.search_runs(
            [tracker.experiment_id],
            f"tags.sweep = '{run_name}' and tags.stage = 'trial'",
            max_results=1000,
            page_token=token,
        )
        for run in page:
            step = run.data.metrics.get("ft_step")
            out[run.data.tags["trial_id"]] = (run.info.run_id, int(step) if step is not None else -1)
        token = page.token
        if not token:
            return out


def forget_orphans(tracker: Tracker, run_name: str, wave: str, trial_ids: set[str], study_path: Path) -> None:
    """After a restored wave: MLflow runs (and Optuna trials) of trials the dead driver had started but
    Tune's last snapshot did not hold; they ran again under new trial ids, so their runs are deleted."""
    from orchestrator.search import fail_running

    tracker.flush()
    orphans = [
        run
        for run in tracker.client.search_runs(
            [tracker.experiment_id], f"tags.sweep = '{run_name}' and tags.wave = '{wave}'", max_results=5000
        )
        if run.data.tags.get("trial_id") not in trial_ids
    ]
    for run in orphans:
        tracker.client.delete_run(run.info.run_id)
    failed = fail_running(study_path)
    if orphans or failed:
        print(
            f"[resume] wave {wave}: removed {len(orphans)} MLflow run(s) and closed {failed} Optuna trial(s) of "
            "trials started after Tune's last snapshot (they ran again under new ids)",
            flush=True,
        )


# -- the defender --------------------------------------------------------------------------------------
def optuna_distribution(dim: Dimension) -> Any:
    import optuna

    if dim.loguniform is not None:
        return optuna.distributions.FloatDistribution(*dim.loguniform, log=True)
    if dim.uniform is not None:
        return optuna.distributions.FloatDistribution(*dim.uniform)
    if dim.randint is not None:
        return optuna.distributions.IntDistribution(*dim.randint)
    return optuna.distributions.CategoricalDistribution(list(dim.choice or dim.grid or []))


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


@dataclass(frozen=True)
class Candidate:
    """A defender candidate run of a defense: its values and its outcome over the attacker's trials."""

    number: int
    run_id: str
    params: dict[str, Any]  # dotted spec path (erase.config...) -> value (as text when read from MLflow)
    worst_resurgence: float  # lower is better for the defender; nan when not logged
    retention: float  # higher is better; nan when not logged
    feasible: bool
    status: str


def candidate_score(rows: list[Row]) -> tuple[float, float]:
    """(worst resurgence any attack reached, retention after erasure) of one candidate's attack trials."""
    peaks = [r["peak_resurgence"] for r in rows if finite(r.get("peak_resurgence"))]
    retention = next((r["retention_erased"] for r in rows if finite(r.get("retention_erased"))), math.nan)
    return (max(peaks) if peaks else math.nan), retention


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
    import optuna

    if resumed:  # refused by the CLI before anything runs; a guard for library callers
        raise SpecError("resume: continuing a defender sweep is not supported yet (start it again)")
    d = spec.defender
    assert d is not None
    folder = sweep_dir(spec, run_name)
    study = defender_study(spec, folder / "defender.journal", f"{run_name}-defender")
    distributions = {path: optuna_distribution(dim) for path, dim in d.space.items()}
    n_cells = len(grid_cells(spec.search.space))
    total = d.candidates * n_cells * spec.search.num_samples
    parents: dict[Any, str] = {}
    callback = MlflowTrials(opening.result, data, tags, parents=parents)
    progress = Progress(total, spec.search.metric, spec.search.mode)
    candidates: list[Candidate] = []
    all_rows: list[Row] = []
    number = 0
    while number < d.candidates:
        k = min(d.per_wave, d.candidates - number)
        asked = [study.ask(distributions) for _ in range(k)]
        tracker, parent = opening.result()
        cells: list[Cell] = []
        for j, trial in enumerate(asked):
            c = number + j
            run = tracker.start_run_later(
                f"candidate-{c}",
                {**tags, "stage": "defender-candidate", "candidate": str(c)},
                parent=parent,
            )
            tracker.log(run, params={f"defender.{p}": str(v) for p, v in trial.params.items()})
            parents[c] = run
            cells += attacker_cells(spec, f"{run_name}-c{c}", fixed={**trial.params, "_candidate": c})
        rows = run_waves(
            spec,
            data,
            cells=cells,
            per_cell=spec.search.num_samples,
            run_name=f"{run_name}-d{number // d.per_wave:03d}",
            study_path=folder / "optuna.journal",
            callbacks=[callback, progress],
            lease_actor=lease,
            on_wave=on_wave,
        )
        all_rows += rows
        for j, trial in enumerate(asked):
            c = number + j
            worst, retention = candidate_score([r for r in rows if r["config"].get("_candidate") == c])
            feasible = finite(retention) and retention >= d.retention_floor
            ok = finite(worst) and finite(retention)
            candidates.append(
                Candidate(c, parents[c], dict(trial.params), worst, retention, feasible, "FINISHED" if ok else "FAILED")
            )
            tracker.log(
                parents[c],
                metrics=[("worst_resurgence", worst, 0), ("retention", retention, 0), ("feasible", float(feasible), 0)],
            )
            if not ok:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                tracker.end(parents[c], "FAILED")
                continue
            # Optuna's constraint convention (both samplers read it): <= 0 is feasible.
            trial.set_constraint("retention_floor", d.retention_floor - retention)
            study.tell(trial, [worst, retention] if d.objective == "pareto" else worst)
            tracker.end(parents[c], "FINISHED")
        number += k
        print(f"[defender] {number}/{d.candidates} candidates attacked; " + best_line(candidates), flush=True)
    tracker, parent = opening.result()
    log_summary(tracker, parent, all_rows, spec, callback)
    best = best_candidate(candidates)
    if best is not None:
        tracker.log(
            parent,
            params={f"best.{p}": str(v) for p, v in best.params.items()} | {"best.candidate": str(best.number)},
            metrics=[("best_worst_resurgence", best.worst_resurgence, 0), ("best_retention", best.retention, 0)],
        )
    print_candidates(candidates, d.objective)
    return all_rows


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The feasible candidates no other feasible one beats on both objectives (worst resurgence lower,
    retention higher), by worst resurgence ascending. Infeasible ones do not compete: the defense rejects them."""
    pool = [c for c in candidates if c.feasible and finite(c.worst_resurgence) and finite(c.retention)]

    def beaten(c: Candidate) -> bool:
        return any(
            o.worst_resurgence <= c.worst_resurgence
            and o.retention >= c.retention
            and (o.worst_resurgence < c.worst_resurgence or o.retention > c.retention)
            for o in pool
        )

    return sorted((c for c in pool if not beaten(c)), key=lambda c: (c.worst_resurgence, -c.retention))


def best_candidate(candidates: Sequence[Candidate]) -> Candidate | None:
    """The feasible candidate with the lowest worst resurgence (ties: the higher retention)."""
    front = pareto_front(candidates)
    return front[0] if front else None


def best_line(candidates: Sequence[Candidate]) -> str:
    best = best_candidate(candidates)
    if best is None:
        return "no feasible candidate yet"
    return (
        f"best: candidate {best.number} worst-case resurgence {best.worst_resurgence:.3f}, "
        f"retention {best.retention:.3f}"
    )


def print_candidates(candidates: Sequence[Candidate], objective: str) -> None:
    front = {c.number for c in pareto_front(candidates)}
    print(f"\nDefender candidates ({objective}; * = on the Pareto front of the feasible ones):")
    for c in sorted(candidates, key=lambda c: (not c.feasible, c.worst_resurgence)):
        params = ", ".join(f"{p}={fmt(v)}" for p, v in c.params.items())
        mark = "*" if c.number in front else " "
        print(
            f" {mark} candidate {c.number}: worst resurgence {fmt(c.worst_resurgence)}, retention "
            f"{fmt(c.retention)}{'' if c.feasible else ' (below the retention floor)'}  [{params}]"
        )
    print(best_line(candidates))


# -- summaries -------------------------------------------------------------------------------------------
def rank(rows: list[Row], spec: ExperimentSpec) -> list[Row]:
    """Best first; trials without the metric after, errors last."""
    sign = -1 if spec.search.mode == "max" else 1
    metric = spec.search.metric
    return sorted(
        rows,
        key=lambda r: (r["error"], not finite(r.get(metric)), sign * r[metric] if finite(r.get(metric)) else 0.0),
    )


def fmt(x: Any) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4g}"
    return str(x)
