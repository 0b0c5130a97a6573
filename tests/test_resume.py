"""A sweep survives its driver's death: killed by SIGKILL at some moment, it is continued by `resurgence
resume` or by the same `run` command, and ends where an uninterrupted sweep ends. After each, `end_state`
checks what the issue asks for, computed from the stores themselves (MLflow, the Optuna journal):

- every trial of the budget ran: one MLflow child run per trial, FINISHED or FAILED, none RUNNING;
- no metric step of a trial run logged twice, and every step of its curve there;
- every cell's Optuna study holds exactly its budget of finished trials, one per trial, none running;
- the parent run FINISHED with the right counts.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import optuna
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


def end_state(tmp_path: Path, experiment: str, trials: int, cells: int = 1, steps: list[int] = STEPS) -> None:
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
                assert logged == steps, (run.data.tags["trial_id"], key, logged)
    parents = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") in ("sweep", "defense")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    metrics = parents[0].data.metrics
    assert metrics["trials_completed"] + metrics.get("trials_failed", 0) == trials
    assert metrics["trials_completed"] == sum(r.info.status == "FINISHED" for r in runs)
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
