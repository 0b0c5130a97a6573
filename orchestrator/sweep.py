"""A sweep on the driver, start to end: its folder and state, the MLflow parent run, the attacker search
(orchestrator/attack.py) or the defender search around it (orchestrator/defender.py), and the report; a sweep
whose driver died is continued from its folder (orchestrator/resume.py)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator.attack import SearchRun, run_attack, sweep_dir
from orchestrator.defender import run_defense
from orchestrator.redaction import redact, redacted_spec
from orchestrator.resume import DriverLock, SweepState, reopen_parent, spec_hash
from orchestrator.search import Row
from orchestrator.spec import Experiment, concept_tag
from orchestrator.store import runs_view
from orchestrator.writer import Tracker, flatten


def open_parent(
    uri: str,
    experiment: Experiment,
    run_name: str,
    tags: dict[str, str],
    stage: str,
    spec_file: str,
    look_first: bool = False,
) -> tuple[Tracker, str]:
    """The MLflow experiment and the sweep's parent run (creating a fresh SQLite store takes seconds);
    `look_first`: a parent run of this sweep that a dead driver made is taken up again."""
    spec, data = experiment.spec, experiment.data
    tracker = Tracker(uri, spec.name, wal=sweep_dir(spec, run_name) / "mlflow.wal")
    sweep_tags = {**tags, "stage": stage, "method": spec.erase.method, "concept": concept_tag(spec)}
    sweep_tags["model"] = spec.model.name
    warnings = experiment.warnings()
    if warnings:
        sweep_tags["warnings"] = " | ".join(warnings)
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
    searched = sorted({*spec.search.space, *(spec.defender.space if spec.defender else {})})
    key, view = runs_view(run_name, spec.search.metric, spec.search.mode, searched)
    tracker.client.set_experiment_tag(tracker.experiment_id, key, view)  # the printed link opens this view
    log_prompt_sets(tracker, parent, experiment)
    return tracker, parent


def log_prompt_sets(tracker: Tracker, run_id: str, experiment: Experiment) -> None:
    """The prompt files the sweep evaluates on, as the parent run's MLflow dataset inputs (name, SHA-256
    digest, file, rows kept). Each trial run also carries them in its evaluator params."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    spec, utility = experiment.spec, experiment.components.utility
    found = {f"concept {c.name}": c.prompt_set for c in spec.concepts if c.prompt_set is not None}
    if utility is not None:
        found |= {name: getattr(utility, name).prompts for name in ("clip_score", "fid") if getattr(utility, name)}
    inputs = []
    for role, prompts in found.items():
        record = prompts.record()
        profile = {k: record[k] for k in ("bytes", "rows_passing", "prompts")}
        dataset = Dataset(
            name=f"{record['file']} ({role})",
            digest=record["sha256"][:32],
            source_type="local",
            source=json.dumps({"uri": os.path.abspath(os.path.expanduser(prompts.path))}),
            profile=json.dumps(profile),
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "evaluation")]))
    if inputs:
        tracker.client.log_inputs(run_id, datasets=inputs)


@dataclass
class Outcome:
    rows: list[Row]  # one per trial
    run_name: str
    parent: str  # the MLflow parent run
    tracker: Tracker  # closed; its write statistics stay readable
    report: Path | None  # the HTML page, when the sweep had a finished trial
    ok: bool  # at least one trial finished


def run_sweep(
    experiment: Experiment,
    uri: str,
    spec_file: str,
    *,
    on_wave: Callable[[int, list[Row]], None] | None = None,
    trial_fn: Callable[..., None] | None = None,
    write_html: bool = True,
    resume: SweepState | None = None,
    one_node: bool = False,
) -> Outcome:
    """The whole sweep on a connected Ray: the lease actor, the parent run, the attacker or defender
    search, the summary metrics and the report; the parent run ends FINISHED when a trial finished.
    `resume`: continue a sweep whose driver died (its state file, its ledger, its MLflow runs and studies).
    `one_node`: this Ray is one machine's alone (the local Ray `resurgence run` starts): the erase cache's
    leases are lock files on its disk, not an actor (an idle Ray worker costs about 1.3% of a core: it
    wakes every 10 ms to check for signals). `trial_fn`: what each trial runs, in place of the real trial
    (benchmarks/sim_cluster.py's sleeps for the stage times of real models)."""
    from orchestrator.cache import start_lease_actor
    from orchestrator.provenance import git_sha, version_tags

    spec, data = experiment.spec, experiment.data
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
        opening = pool.submit(open_parent, uri, experiment, run_name, tags, stage, spec_file, resume is not None)
    pool.shutdown(wait=False)
    status, ended = "FAILED", False
    try:
        state.parent = opening.result()[1]
        state.save(folder)
        search = SearchRun(experiment, opening, run_name, tags, lease, on_wave, resume is not None, trial_fn)
        rows = run_defense(search) if spec.defender is not None else run_attack(search)
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
