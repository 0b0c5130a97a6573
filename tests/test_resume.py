"""A sweep survives its driver's death: killed by SIGKILL at some moment, it is continued by `resurgence
resume` or by the same `run` command, and ends where an uninterrupted sweep ends. After each, `end_state`
checks what the issue asks for, computed from the stores themselves (MLflow, the Optuna journal):

- every trial of the budget ran: one MLflow child run per trial, FINISHED or FAILED, none RUNNING;
- no metric step of a trial run logged twice, and every step of its curve there;
- every cell's Optuna study holds exactly its budget of finished trials, one per trial, none running;
- the parent run FINISHED with the right counts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.test_e2e import resurgence_cmd

SMOKE = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
STEPS = [0, 5, 10, 15]


def small_spec(tmp_path: Path, name: str, **search) -> Path:
    """The smoke sweep made small and deterministic: UCE (closed form), 15 fine-tuning steps, no early
    stopping, so every trial's curve is [0, 5, 10, 15]."""
    data = {**SMOKE, "name": name}
    data["finetune"] = {**SMOKE["finetune"], "config": {**SMOKE["finetune"]["config"], "steps": 15}}
    space = {
        "finetune.config.lr": {"loguniform": [1e-5, 1e-3]},
        "finetune.config.trainable": {"choice": ["full", "xattn"]},
    }
    data["search"] = {**SMOKE["search"], "space": space, **search}
    data["search"].pop("scheduler")
    data["evaluate"] = {**SMOKE["evaluate"], "config": {"images_per_prompt": 1, "steps": 4}}
    data["erase"] = {"method": "uce"}
    data.pop("smoke")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def finished_trials(tmp_path: Path) -> int:
    """Trial runs MLflow already holds as FINISHED (read straight from the SQLite store, as the UI would)."""
    db = tmp_path / "mlflow.db"
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            (n,) = conn.execute(
                "select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
                "where t.key = 'stage' and t.value = 'trial' and r.status = 'FINISHED'"
            ).fetchone()
        return n
    except sqlite3.Error:  # not created yet, or busy
        return 0


def start(tmp_path: Path, env: dict, *args: str, log: str = "driver.log") -> subprocess.Popen:
    out = open(tmp_path / log, "a")  # noqa: SIM115
    return subprocess.Popen(
        [*resurgence_cmd(), *args],
        cwd=tmp_path,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_when(driver: subprocess.Popen, tmp_path: Path, ready, what: str, timeout_s: float = 600) -> None:
    """SIGKILL the driver and everything it started (a lost machine) once `ready()` holds."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert driver.poll() is None, f"driver ended before {what}: " + (tmp_path / "driver.log").read_text()[-4000:]
        assert time.monotonic() < deadline, f"never reached {what}: " + (tmp_path / "driver.log").read_text()[-4000:]
        time.sleep(0.2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    time.sleep(1)


def run_cli(tmp_path: Path, env: dict, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*resurgence_cmd(), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def end_state(tmp_path: Path, experiment: str, trials: int, cells: int = 1, steps: list[int] | None = STEPS) -> None:
    """The issue's end state (see the module docstring); `steps`: every finished trial's curve exactly (None:
    curves that early stopping may cut, checked for no step twice)."""
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'trial'", max_results=5000)
    ids = Counter(r.data.tags["trial_id"] for r in runs)
    assert len(runs) == trials and len(ids) == trials, ids
    assert all(r.info.status in ("FINISHED", "FAILED") for r in runs), Counter(r.info.status for r in runs)
    for run in runs:
        if run.info.status == "FINISHED":
            for key in ("ft_step", "resurgence", "presence"):
                logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
                if steps is None:
                    assert logged[0] == 0 and len(set(logged)) == len(logged), (run.data.tags["trial_id"], key, logged)
                else:
                    assert logged == steps, (run.data.tags["trial_id"], key, logged)
    parents = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") in ("sweep", "defense")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    metrics = parents[0].data.metrics
    assert metrics["trials_completed"] + metrics.get("trials_failed", 0) == trials
    assert metrics["trials_completed"] == sum(r.info.status == "FINISHED" for r in runs)
    # every trial's erased model came from somewhere, counted once over all the drivers
    assert sum(v for k, v in metrics.items() if k.startswith("erase_cache_")) == metrics["trials_completed"]
    for key in ("trials_completed", "trials_failed"):
        assert len(client.get_metric_history(parents[0].info.run_id, key)) == 1, key
    # The Optuna studies: each cell's budget of finished trials, one per trial, none left running.
    journal = next((tmp_path / "ray_results").glob("*/optuna.journal"))
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    studies = [s for s in optuna.get_all_study_summaries(storage) if not s.study_name.endswith("-defender")]
    assert len(studies) == cells
    told = Counter()
    for summary in studies:
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        kept = [t for t in study.trials if not t.user_attrs.get("abandoned")]
        assert all(t.state.is_finished() for t in study.trials), [t.state for t in study.trials]
        assert len(kept) == trials // cells, (summary.study_name, len(kept))
        told.update(t.user_attrs["trial"] for t in kept)
    assert set(told) == set(ids) and max(told.values()) == 1


def test_a_driver_killed_mid_wave_with_trials_finished_is_continued_by_the_same_command(tmp_path, isolated_env):
    """The issue's case: one wave, two trials at a time, several finished, SIGKILL, the same command again."""
    spec = small_spec(tmp_path, "mid-wave", num_samples=8, max_concurrent_trials=2)
    driver = start(tmp_path, isolated_env, "run", str(spec), "--num-cpus", "2")
    kill_when(driver, tmp_path, lambda: finished_trials(tmp_path) >= 3, "3 finished trials")
    out = run_cli(tmp_path, isolated_env, "run", str(spec), "--num-cpus", "2")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "continuing sweep mid-wave-" in out.stdout
    end_state(tmp_path, "mid-wave", 8)


# -- the pieces, without Ray: the ledger and the searcher that keeps the studies in line with it -----------
def test_the_ledger_drops_a_line_cut_short_by_a_kill_and_refuses_a_damaged_one(tmp_path):
    from orchestrator.ledger import LedgerError, TrialLedger

    ledger = TrialLedger(tmp_path)
    ledger.record("t00000", {"resurgence": 0.5, "error": False})
    ledger.checkpoint("t00001", "/ckpt/a")
    with open(ledger.path, "a") as f:
        f.write('{"slot": "t00001", "row": {"resurg')  # the driver died mid-write
    again = TrialLedger(tmp_path)
    assert list(again.done()) == ["t00000"] and again.checkpoints() == {"t00001": "/ckpt/a"}
    again.record("t00001", {"resurgence": 0.1, "error": False})  # lands on a line of its own
    assert set(TrialLedger(tmp_path).done()) == {"t00000", "t00001"}
    lines = ledger.path.read_text().splitlines()
    ledger.path.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(LedgerError, match="line 2 is not a ledger record"):
        TrialLedger(tmp_path).done()


def test_a_new_driver_takes_up_the_dead_drivers_optuna_trials_and_tells_each_once(tmp_path):
    """A dead driver had: t0 ended and told; t1 ended (in the ledger) but not told; t2 asked and running; a
    trial begun inside `ask` with no slot. The next driver, given the slots the ledger lacks, tells t1 from
    its ledger row, closes the slotless trial as failed, hands t2 out again with the same values through the
    same Optuna trial, and asks t3 fresh: every slot ends with exactly one finished trial."""
    from orchestrator.ledger import TrialLedger
    from orchestrator.resolved import RESOLVED_KEY
    from orchestrator.search import Cell, study_storage
    from tests.test_search import SPACE, searcher

    cells = [Cell({}, "s-cell0", 0)]
    dead = searcher(tmp_path, cells, [(s, 0) for s in ("t0", "t1", "t2", "t3")])
    first = [dead.suggest(f"a{i}") for i in range(3)]
    assert [c["_trial"] for c in first] == ["t0", "t1", "t2"]
    dead.on_trial_complete("a0", {"resurgence": 0.25})
    dead.ledger.record("t1", {"resurgence": 0.5, "error": False})  # ... and the driver died before the tell
    dead.studies[0].ask()  # a trial another death left inside `ask`, without a slot

    storage = study_storage(tmp_path / "optuna.journal")
    assert sum(t.state.name == "RUNNING" for t in optuna.load_study(study_name="s-cell0", storage=storage).trials) == 3
    nxt = searcher(tmp_path, cells, [("t2", 0), ("t3", 0)])
    study = optuna.load_study(study_name="s-cell0", storage=storage)
    by_slot = {t.user_attrs.get("trial"): t for t in study.trials}
    assert by_slot["t1"].state.name == "COMPLETE" and by_slot["t1"].value == 0.5  # from the ledger's row
    assert by_slot[None].state.name == "FAIL" and by_slot[None].user_attrs["abandoned"] is True  # the slotless one
    assert all(not t.user_attrs.get("abandoned") for t in study.trials if "trial" in t.user_attrs)
    again = nxt.suggest("b0")
    again = {k: v for k, v in again.items() if k != RESOLVED_KEY}
    assert again == {**{k: first[2][k] for k in SPACE}, "_trial": "t2"}  # the same values, the same trial
    assert nxt.suggest("b1")["_trial"] == "t3"
    nxt.on_trial_complete("b0", {"resurgence": 0.75})
    nxt.on_trial_complete("b1", None, error=True)
    study = optuna.load_study(study_name="s-cell0", storage=storage)
    slotted = Counter(t.user_attrs["trial"] for t in study.trials if "trial" in t.user_attrs)
    assert slotted == Counter({"t0": 1, "t1": 1, "t2": 1, "t3": 1})
    assert all(t.state.is_finished() for t in study.trials)
    values = {t.user_attrs.get("trial"): (t.state.name, t.value) for t in study.trials}
    assert values["t2"] == ("COMPLETE", 0.75) and values["t3"] == ("FAIL", None)
    rows = TrialLedger(tmp_path).done()
    assert set(rows) == {"t0", "t1", "t2", "t3"} and rows["t3"]["error"] is True


def test_the_defender_study_takes_up_asked_candidates_and_marks_a_slotless_trial_abandoned(tmp_path):
    """The defender's own study, mended alike: candidates 0 and 1 asked (1 still running) come back as live
    trials with their values; a trial begun inside `ask` with no candidate is closed as failed, abandoned."""
    from orchestrator.defender import mend_defender_study
    from orchestrator.search import study_storage

    space = {"gamma": optuna.distributions.FloatDistribution(0.0, 1.0)}
    study = optuna.create_study(study_name="d", storage=study_storage(tmp_path / "defender.journal"))
    asked = [study.ask(space) for _ in range(2)]
    for c, trial in enumerate(asked):
        trial.set_user_attr("candidate", c)
    study.tell(asked[0], 0.5)
    study.ask(space)  # the driver died inside `ask`
    again = optuna.load_study(study_name="d", storage=study_storage(tmp_path / "defender.journal"))
    by_candidate = mend_defender_study(again, {"gamma"})
    assert sorted(by_candidate) == [0, 1] and by_candidate[1].params == asked[1].params
    states = [(t.state.name, t.user_attrs.get("candidate"), t.user_attrs.get("abandoned")) for t in again.trials]
    assert states == [("COMPLETE", 0, None), ("RUNNING", 1, None), ("FAIL", None, True)]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("layout", r"was written by another version of resurgence \(layout 1, this version continues layout 2\)"),
        ("spec", r"spec\.json changed since the sweep started"),
        ("journal", r"the Optuna journal .*optuna\.journal cannot be read"),
        ("ledger", r"trials\.jsonl: line 1 is not a ledger record"),
    ],
)
@pytest.mark.parametrize("command", ["resume", "run"])
def test_what_cannot_be_continued_is_refused_in_one_line_and_nothing_is_deleted(
    tmp_path, monkeypatch, capsys, damage, message, command
):
    import ray

    from orchestrator.cli import main
    from orchestrator.resume import SweepState, spec_hash

    monkeypatch.chdir(tmp_path)
    spec = small_spec(tmp_path, "damaged", num_samples=4)
    data = yaml.safe_load(spec.read_text())
    folder = tmp_path / "ray_results" / "damaged-1"
    folder.mkdir(parents=True)
    (folder / "spec.json").write_text(json.dumps(data))
    (folder / "trials.jsonl").write_text(json.dumps({"slot": "t00000", "row": {"error": False}}) + "\n")
    state = SweepState(
        "damaged-1", str(spec), f"sqlite:///{tmp_path / 'mlflow.db'}", None, spec_hash(data), "running", "now"
    )
    state.save(folder)
    if damage == "layout":  # a folder an earlier version wrote: no layout number
        record = json.loads((folder / "sweep.json").read_text())
        del record["layout"]
        (folder / "sweep.json").write_text(json.dumps(record))
    elif damage == "spec":
        (folder / "spec.json").write_text(json.dumps({**data, "seed": 7}))
    elif damage == "journal":
        (folder / "optuna.journal").write_text(
            '{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}\n{"op_code": 99}\n'
        )
    else:
        (folder / "trials.jsonl").write_text('{"slot": "t00000", "ro\n' + (folder / "trials.jsonl").read_text())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    if command == "run" and damage == "spec":
        state.spec_hash = spec_hash({**data, "seed": 7})  # `run` finds it by the hash of the spec it was given
        state.save(folder)
        before["sweep.json"] = (folder / "sweep.json").read_bytes()
        (folder / "spec.json").write_text(json.dumps(data))
        before["spec.json"] = (folder / "spec.json").read_bytes()
        spec.write_text(yaml.safe_dump({**data, "seed": 7}))
    args = ["resume", str(folder)] if command == "resume" else ["run", str(spec)]
    assert main([*args, "--num-cpus", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("resurgence: error: sweep damaged-1"), err
    assert re.search(message, err), err
    assert ("--new" in err) and "left as it is" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing deleted, nothing changed
    assert not ray.is_initialized() and not (tmp_path / "mlflow.db").exists()


# -- the driver killed at distinct moments (slow: minutes each) -----------------------------------------
def ledger_rows(tmp_path: Path) -> int:
    """Trials the sweep's ledger holds as ended (what the dead driver had finished)."""
    n = 0
    for ledger in (tmp_path / "ray_results").glob("*/trials.jsonl"):
        n += sum('"row"' in line for line in ledger.read_text().splitlines())
    return n


def trial_started(tmp_path: Path) -> bool:
    return any((tmp_path / "ray_results").glob("*/*/params.json"))


def continue_sweep(tmp_path: Path, env: dict, how: str, spec: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["resume"] if how == "resume" else ["run", str(spec), *extra]
    out = run_cli(tmp_path, env, *args, "--num-cpus", "2")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "continuing sweep" in out.stdout
    return out


MOMENTS = {  # name: (search settings, when to kill, how to continue)
    "before any report": ({"num_samples": 4}, trial_started, "resume"),
    "mid-wave": ({"num_samples": 8}, lambda p: ledger_rows(p) >= 2, "run"),
    "between waves": ({"num_samples": 6, "wave_size": 3}, lambda p: ledger_rows(p) >= 3, "resume"),
    "while the report is written": ({"num_samples": 4}, lambda p: (p / "reports").exists(), "run"),
}


@pytest.mark.slow  # about 1.5 minutes each on 2 cores: run by .ci/run with -m slow
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_driver_killed_at_any_moment_is_continued_to_the_same_end(tmp_path, isolated_env, moment):
    search, ready, how = MOMENTS[moment]
    spec = small_spec(tmp_path, "moment", max_concurrent_trials=2, **search)
    driver = start(tmp_path, isolated_env, "run", str(spec), "--num-cpus", "2")
    kill_when(driver, tmp_path, lambda: ready(tmp_path), moment)
    if moment == "between waves":  # the first wave ended and the second had not yet reported
        assert ledger_rows(tmp_path) == 3
    continue_sweep(tmp_path, isolated_env, how, spec)
    end_state(tmp_path, "moment", search["num_samples"])


@pytest.mark.slow
def test_a_second_death_during_the_resume_is_survived(tmp_path, isolated_env):
    spec = small_spec(tmp_path, "twice", num_samples=8, max_concurrent_trials=2)
    driver = start(tmp_path, isolated_env, "run", str(spec), "--num-cpus", "2")
    kill_when(driver, tmp_path, lambda: ledger_rows(tmp_path) >= 2, "2 ended trials")
    first = ledger_rows(tmp_path)
    driver = start(tmp_path, isolated_env, "resume", "--num-cpus", "2")
    kill_when(driver, tmp_path, lambda: ledger_rows(tmp_path) >= first + 2, "2 more ended trials in the resume")
    assert "continuing sweep twice-" in (tmp_path / "driver.log").read_text()
    continue_sweep(tmp_path, isolated_env, "run", spec)
    end_state(tmp_path, "twice", 8)


@pytest.mark.slow
def test_a_driver_killed_during_a_defender_wave_is_continued(tmp_path, isolated_env):
    """Two candidates, one per defender wave, two attacks each; killed in the second defender wave."""
    data = yaml.safe_load((REPO / "search_spaces" / "toy_defense.yaml").read_text())
    data["defender"]["per_wave"] = 1
    data["search"]["max_concurrent_trials"] = 1
    data["smoke"]["search.num_samples"] = 2
    spec = tmp_path / "toy_defense.yaml"
    spec.write_text(yaml.safe_dump(data))
    driver = start(tmp_path, isolated_env, "run", str(spec), "--smoke-test", "--num-cpus", "2")
    kill_when(driver, tmp_path, lambda: ledger_rows(tmp_path) >= 3, "the second defender wave", timeout_s=900)
    out = continue_sweep(tmp_path, isolated_env, "run", spec, "--smoke-test")
    assert "[defender] 2/2 candidates attacked; best: candidate" in out.stdout
    end_state(tmp_path, "toy-defense", 4, cells=2, steps=None)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("toy-defense").experiment_id])
    candidates = [r for r in runs if r.data.tags.get("stage") == "defender-candidate"]
    assert sorted(r.data.tags["candidate"] for r in candidates) == ["0", "1"]
    for run in candidates:
        assert run.info.status in ("FINISHED", "FAILED")
        for key in ("worst_resurgence", "retention", "feasible"):
            assert len(client.get_metric_history(run.info.run_id, key)) == 1, key
    journal = next((tmp_path / "ray_results").glob("*/defender.journal"))
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert all(t.state.is_finished() for t in study.trials)
    assert sorted(t.user_attrs["candidate"] for t in study.trials if "candidate" in t.user_attrs) == [0, 1]
