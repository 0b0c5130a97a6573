"""The cluster path for real, on loopback: `ray start --head` and an `mlflow server` (SQLite backend, an
artifact folder), the smoke sweep submitted with `ray job submit --working-dir . -- python -m orchestrator
run ...` exactly as cluster/README.md says, then the runs and artifacts in that server. And an MLflow
server that is down for a minute mid-sweep: nothing is lost, and the log says so. Both servers are stopped
afterwards with every process they started."""

from __future__ import annotations

import json
import re
import subprocess
import time

import psutil
import pytest
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.servers import BIN, MlflowServer, RayHead
from tests.test_faults import assert_one_clean_run_per_trial, fault_spec


@pytest.fixture
def server_env(isolated_env):
    """The isolated environment, with this virtual environment's tools first on PATH (the job's `python`)."""
    return {**isolated_env, "PATH": f"{BIN}:{isolated_env['PATH']}"}


def readme_submit_command() -> list[str]:
    """The `ray job submit` line of cluster/README.md, as its words."""
    text = (REPO / "cluster" / "README.md").read_text()
    block = re.search(r"# submit the smoke sweep\n(ray job submit[^\n]*(?:\\\n[^\n]*)*)", text)
    assert block, "cluster/README.md lost its smoke-sweep submit command"
    return block.group(1).replace("\\\n", " ").split()


def test_ray_job_submit_to_a_ray_head_with_an_mlflow_server(tmp_path, server_env):
    secret = "s3cr3t-value-never-logged"
    env = {**server_env, "MY_SERVICE_TOKEN": secret}
    mlflow_server = MlflowServer(tmp_path, env).start()
    head = RayHead(tmp_path, env).start()
    try:
        words = readme_submit_command()
        storage = tmp_path / "ray_results"
        values = {
            "http://127.0.0.1:8265": head.address,
            "http://127.0.0.1:5000": mlflow_server.uri,
            "/shared/ray_results": str(storage),
        }
        cmd = [values.get(w, w) for w in words]
        cmd[0] = str(BIN / "ray")
        assert cmd[cmd.index("--") + 1 :][:4] == ["python", "-m", "orchestrator", "run"]
        cmd[cmd.index("--") :] = [*cmd[cmd.index("--") :], "--smoke-test"]
        cmd[cmd.index("submit") + 1 : cmd.index("submit") + 1] = ["--submission-id", "smoke-job"]
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-5000:]
        status = subprocess.run(
            [str(BIN / "ray"), "job", "status", "--address", head.address, "smoke-job"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "job 'smoke-job' succeeded" in (status.stdout + status.stderr).lower()

        client = MlflowClient(mlflow_server.uri)
        exp = client.get_experiment_by_name("smoke")
        runs = client.search_runs([exp.experiment_id])
        parent = next(r for r in runs if r.data.tags.get("stage") == "sweep")
        trials = [r for r in runs if r.data.tags.get("stage") == "trial"]
        assert parent.info.status == "FINISHED" and len(trials) == 2  # the smoke test's two trials
        assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"experiment.yaml", "report"}
        logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
        assert {"report/index.html", "report/trials.parquet", "report/curves.png"} <= logged
        for t in trials:
            assert t.info.status == "FINISHED" and t.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert [a.path for a in client.list_artifacts(t.info.run_id)] == ["samples.png"]
            assert "resurgence" in t.data.metrics and "presence_erased" in t.data.metrics
        # the artifacts went through the server into its artifact folder
        assert list((tmp_path / "artifacts").rglob("samples.png")) and list(
            (tmp_path / "artifacts").rglob("index.html")
        )
        # an environment secret of the job never reaches params, tags or artifacts
        for r in runs:
            assert secret not in json.dumps([r.data.params, r.data.tags])
        for path in (tmp_path / "artifacts").rglob("*"):
            if path.is_file() and path.suffix in (".yaml", ".html", ".json", ".txt"):
                assert secret not in path.read_text(errors="ignore"), path

        # A run without --address and without RAY_ADDRESS, on this machine where the `ray start` cluster
        # runs, starts a Ray of its own (ray.init would join that cluster and refuse --num-cpus).
        (tmp_path / "local").mkdir()
        local = subprocess.run(
            [str(BIN / "python"), "-m", "orchestrator", "run", str(REPO / "search_spaces" / "smoke.yaml")]
            + ["--smoke-test", "--num-cpus", "1"],
            cwd=tmp_path / "local",
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert local.returncode == 0, (local.stdout + local.stderr)[-4000:]
        assert "Ray: 1 CPUs, 0 GPUs" in local.stdout  # its own: the cluster has 2
        assert (tmp_path / "local" / "mlflow.db").exists()
    finally:
        head.stop()
        mlflow_server.stop()
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if (
                str(tmp_path) in " ".join(proc.info["cmdline"] or [])
                or proc.environ().get("RAY_TMPDIR") == env["RAY_TMPDIR"]
            ):
                left.append(proc.info)
        except psutil.Error:
            continue
    assert not left, f"processes left behind: {left}"


@pytest.mark.slow  # minutes: run by .ci/run with -m slow
def test_an_mlflow_server_down_for_a_minute_loses_no_metric(tmp_path, server_env):
    mlflow_server = MlflowServer(tmp_path, server_env).start()
    spec = fault_spec(tmp_path, "outage")
    driver = None
    try:
        log_file = open(tmp_path / "driver.log", "w")  # noqa: SIM115
        driver = subprocess.Popen(
            [str(BIN / "resurgence"), "run", str(spec), "--num-cpus", "2", "--tracking-uri", mlflow_server.uri],
            cwd=tmp_path,
            env=server_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        client = MlflowClient(mlflow_server.uri)
        deadline = time.monotonic() + 600
        while True:  # the server goes down once the first trial has logged a step
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-4000:]
            assert time.monotonic() < deadline
            exp = client.get_experiment_by_name("outage")
            if exp and any(
                "ft_step" in r.data.metrics for r in client.search_runs([exp.experiment_id], "tags.stage = 'trial'")
            ):
                break
            time.sleep(1)
        mlflow_server.stop()
        time.sleep(60)
        mlflow_server.start()  # the same store, the same port
        assert driver.wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()[-4000:]
    finally:
        if driver is not None and driver.poll() is None:
            driver.kill()
        mlflow_server.stop()
    log = (tmp_path / "driver.log").read_text()
    assert "MLflow is unreachable" in log and "the sweep goes on" in log
    assert re.search(r"MLflow is reachable again after \d+ s; replayed \d+ writes, nothing lost", log)
    mlflow_server.start()
    try:
        client = MlflowClient(mlflow_server.uri)
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id], "tags.stage = 'trial'")
        assert_one_clean_run_per_trial(client, runs, 2, [0, 5, 10, 15])
        assert all(r.info.status == "FINISHED" for r in runs)
        parent = client.search_runs([exp.experiment_id], "tags.stage = 'sweep'")[0]
        assert parent.info.status == "FINISHED" and parent.data.metrics["trials_completed"] == 2
    finally:
        mlflow_server.stop()
