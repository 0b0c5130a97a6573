"""Faults, each through the real command on a local Ray: a trial that raises is retried while the others go
on; a diverging fine-tune ends with its outcome recorded; a worker killed mid-trial continues from the
trial's last checkpoint; a driver killed by SIGKILL mid-sweep is continued by `resurgence resume`. After
each, MLflow holds exactly one child run per trial (none lost, none duplicated), each with every step of
its curve exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.faults import fault_env
from tests.test_e2e import resurgence_cmd

SMOKE = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())


def fault_spec(tmp_path: Path, name: str, **changes) -> Path:
    """The smoke sweep, made small and deterministic: fixed steps, two learning rates, checkpoints."""
    data = {**SMOKE, "name": name}
    data["finetune"] = {**SMOKE["finetune"], "config": {**SMOKE["finetune"]["config"], "steps": 15}}
    data["search"] = {**SMOKE["search"], "num_samples": 2, "space": {"finetune.config.lr": {"choice": [1e-4, 2e-4]}}}
    data["search"].pop("scheduler")  # every trial runs to its end
    data["failure"] = {"max_failures": 1, "checkpoint_every": 5}
    data["evaluate"] = {**SMOKE["evaluate"], "config": {"images_per_prompt": 1, "steps": 4}}
    data["erase"] = {"method": "uce"}  # closed form: no time spent erasing
    for key, value in changes.items():
        data[key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def trial_runs(tmp_path: Path, experiment: str) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], "tags.stage = 'trial'")


def assert_one_clean_run_per_trial(client: MlflowClient, runs: list, trials: int, steps: list[int]) -> None:
    """Exactly `trials` runs, one per trial id, each with every step of its curve exactly once."""
    assert len(runs) == trials, [r.data.tags.get("trial_id") for r in runs]
    assert len({r.data.tags["trial_id"] for r in runs}) == trials
    for run in runs:
        for key in ("ft_step", "resurgence", "presence"):
            logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert logged == steps, (key, logged)


def run_cli(tmp_path: Path, env: dict, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*resurgence_cmd(), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_a_raising_trial_is_retried_from_its_checkpoint_while_the_other_goes_on(tmp_path, isolated_env):
    env = fault_env(isolated_env, tmp_path, raise_at=10, only="_1_")
    out = run_cli(tmp_path, env, "run", str(fault_spec(tmp_path, "raises")), "--num-cpus", "2")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "injected fault at ft_step 10" in log
    assert "trial continues from its checkpoint at ft_step 5" in log  # not from scratch
    assert "[progress] 2/2 trials done (0 running, 0 failed)" in out.stdout
    client, runs = trial_runs(tmp_path, "raises")
    assert_one_clean_run_per_trial(client, runs, 2, [0, 5, 10, 15])
    retried = [r for r in runs if r.data.tags.get("retries")]
    assert len(retried) == 1 and retried[0].data.tags["retries"] == "1"
    assert all(r.info.status == "FINISHED" and r.data.tags["outcome"] == "completed" for r in runs)


def test_a_killed_worker_continues_from_the_last_checkpoint(tmp_path, isolated_env):
    env = fault_env(isolated_env, tmp_path, kill_at=10, only="_2_")
    out = run_cli(tmp_path, env, "run", str(fault_spec(tmp_path, "killed")), "--num-cpus", "2")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "trial continues from its checkpoint at ft_step 5" in log
    client, runs = trial_runs(tmp_path, "killed")
    assert_one_clean_run_per_trial(client, runs, 2, [0, 5, 10, 15])
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.tags.get("retries", "0") for r in runs) == ["0", "1"]


def test_a_diverging_fine_tune_ends_with_its_outcome_and_the_sweep_goes_on(tmp_path, isolated_env):
    spec = fault_spec(
        tmp_path,
        "diverges",
        failure={"max_failures": 1},  # a divergence is not a crash: never retried
        search={
            **SMOKE["search"],
            "num_samples": 2,
            "scheduler": None,
            "space": {"finetune.config.lr": {"grid": [1e-4, 1.0]}},  # lr 1 with SGD and no clipping blows up
        },
    )
    data = yaml.safe_load(spec.read_text())
    data["search"].pop("scheduler")
    data["search"]["num_samples"] = 1  # one trial per grid cell
    data["finetune"]["config"] |= {"optimizer": "sgd", "max_grad_norm": None, "trainable": "full"}
    spec.write_text(yaml.safe_dump(data))
    out = run_cli(tmp_path, isolated_env, "run", str(spec), "--num-cpus", "2")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "fine-tuning diverged at step" in log
    client, runs = trial_runs(tmp_path, "diverges")
    assert len(runs) == 2
    by_lr = {float(r.data.params["finetune.config.lr"]): r for r in runs}
    bad, good = by_lr[1.0], by_lr[1e-4]
    assert bad.info.status == "FAILED" and bad.data.tags["outcome"] == "diverged"
    assert bad.data.metrics["diverged"] == 1.0 and "retries" not in bad.data.tags
    assert good.info.status == "FINISHED" and good.data.tags["outcome"] == "completed"


def test_a_driver_killed_mid_sweep_is_continued_by_resume(tmp_path, isolated_env):
    """Two waves of two trials; the driver is SIGKILLed once the second wave has started, then
    `resurgence resume` finishes the sweep: four trial runs, each complete, and the parent FINISHED."""
    spec = fault_spec(tmp_path, "killed-driver")
    data = yaml.safe_load(spec.read_text())
    data["search"] |= {"num_samples": 4, "wave_size": 2, "max_concurrent_trials": 1}
    data["search"]["space"] = {"finetune.config.lr": {"loguniform": [1e-5, 1e-3]}}
    spec.write_text(yaml.safe_dump(data))
    log_file = open(tmp_path / "driver.log", "w")  # noqa: SIM115
    driver = subprocess.Popen(
        [*resurgence_cmd(), "run", str(spec), "--num-cpus", "2"],
        cwd=tmp_path,
        env=isolated_env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    # Kill once the second wave has a trial that reported (the first wave is done and written down).
    deadline = time.monotonic() + 600
    while not any(p.stat().st_size for p in (tmp_path / "ray_results").glob("killed-driver-*-wave001/*/result.json")):
        assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
        assert time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-4000:]
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started (a lost machine)
    driver.wait(timeout=60)
    log_file.close()
    time.sleep(2)
    folder = next((tmp_path / "ray_results").glob("killed-driver-*/sweep.json")).parent
    assert json.loads((folder / "sweep.json").read_text())["status"] == "running"

    out = run_cli(tmp_path, isolated_env, "resume", "--num-cpus", "2")
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert f"continuing sweep {folder.name}" in out.stdout
    client, runs = trial_runs(tmp_path, "killed-driver")
    assert_one_clean_run_per_trial(client, runs, 4, [0, 5, 10, 15])
    assert all(r.info.status == "FINISHED" for r in runs)
    exp = client.get_experiment_by_name("killed-driver")
    parent = client.search_runs([exp.experiment_id], "tags.stage = 'sweep'")
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert parent[0].data.metrics["trials_completed"] == 4
    assert json.loads((folder / "sweep.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("secret", ["hf_s3cr3t_t0ken_value"])
def test_secrets_stay_out_of_params_and_artifacts(tmp_path, secret):
    from orchestrator.redaction import redact, redacted_spec

    os.environ["HF_TOKEN"] = secret
    try:
        params = redact(
            {"model.config.path": f"/models/{secret}/sd", "model.config.hub_token": "abc", "a.tokens": "all"}
        )
        assert params == {
            "model.config.path": "[redacted]",
            "model.config.hub_token": "[redacted]",
            "a.tokens": "all",  # UCE's `tokens` is not a secret
        }
        spec = redacted_spec({"model": {"config": {"path": secret, "api_key": "k"}}, "erase": {"tokens": "all"}})
        assert spec == {
            "model": {"config": {"path": "[redacted]", "api_key": "[redacted]"}},
            "erase": {"tokens": "all"},
        }
    finally:
        del os.environ["HF_TOKEN"]
