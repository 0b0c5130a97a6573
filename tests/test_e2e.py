"""End to end: `resurgence run search_spaces/smoke.yaml` on a local Ray with 2 CPUs, then the MLflow store."""

import os
import re
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from tests.conftest import REPO


def resurgence_cmd() -> list[str]:
    script = Path(sys.executable).parent / "resurgence"
    return [str(script)] if script.exists() else [sys.executable, "-m", "orchestrator"]


def test_smoke_sweep_end_to_end(tmp_path, isolated_env):
    out = subprocess.run(
        [*resurgence_cmd(), "run", str(REPO / "search_spaces" / "smoke.yaml"), "--num-cpus", "2"],
        cwd=tmp_path,
        env=isolated_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "Best trials by resurgence (max), 4 in all:" in out.stdout
    assert re.search(r"Ray: 2 CPUs, 0 GPUs", out.stdout)  # the local Ray has exactly 2 CPUs
    assert re.search(r"\[progress\] 4/4 trials done \(0 running, 0 failed\) \| best resurgence -?[0-9.]+", out.stdout)
    db = tmp_path / "mlflow.db"
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in out.stdout

    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_completed"] == 4
    assert "best_resurgence" in parent.data.metrics
    # erase once: the four trials share one erase config, so exactly one of them erased
    assert parent.data.metrics["erase_cache_miss"] == 1
    assert sorted(r.data.tags["erase_cache"] for r in runs if "erase_cache" in r.data.tags).count("miss") == 1
    # on the local Ray the leases are lock files on this machine (no lease actor), all released at the end
    leases = tmp_path / ".resurgence_cache" / "erased" / "leases"
    assert leases.is_dir() and not list(leases.iterdir())
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"experiment.yaml", "report"}
    # the report written at the end of the run, also logged to the parent run
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/index.html", "report/trials.parquet", "report/curves.png"} <= logged
    sweep = parent.data.tags["sweep"]
    assert (tmp_path / "reports" / sweep / "index.html").is_file() and f"reports/{sweep}/index.html" in out.stdout

    trial_ids = set()
    for run in children:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED"
        assert tags["method"] == "esd" and tags["concept"] == "circle" and tags["model"] == "tiny-sd"
        for pkg in ("torch", "diffusers", "transformers", "ray"):
            assert tags[f"version.{pkg}"]
        assert len(tags["git_sha"]) == 40 or tags["git_sha"] == "unknown"
        trial_ids.add(tags["trial_id"])
        # params: the trial's resolved config, defaults included, with its sampled values
        assert params["erase.config.variant"] == "esd-x" and params["erase.config.start_guidance"] == "3.0"
        assert params["finetune.config.trainable"] in ("full", "xattn", "lora")
        assert 1e-5 <= float(params["finetune.config.lr"]) <= 1e-3
        for key in ("presence_base", "presence_erased", "retention", "presence", "resurgence"):
            assert key in metrics
        history = client.get_metric_history(run.info.run_id, "resurgence")
        steps = sorted(m.step for m in history)
        assert steps[0] == 0 and len(steps) >= 2 and steps == sorted(set(steps))
        assert [m.value for m in history if m.step == 0] == [0.0]  # zero right after erasure, by definition
        presence = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "presence")}
        for m in history:  # resurgence = presence - presence right after erasure, at every step
            assert abs(m.value - (presence[m.step] - metrics["presence_erased"])) < 1e-9
        for key in ("presence", "resurgence"):  # each with its 95% interval at every step
            value = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            low = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"{key}_lo")}
            high = {m.step: m.value for m in client.get_metric_history(run.info.run_id, f"{key}_hi")}
            assert low.keys() == high.keys() == value.keys()
            assert all(low[s] <= value[s] <= high[s] and low[s] < high[s] for s in value)
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["samples.png"]
    assert len(trial_ids) == 4
    assert os.path.isdir(tmp_path / "ray_results")
