"""The shipped detector specs: refused in one line naming the first missing input, and their smoke sweeps
land in MLflow with every evaluator's record (name, version, weights hash, threshold, class set, images,
prompt files' hashes) and the utility metrics."""

import json
import subprocess

import pytest
from mlflow import MlflowClient

from orchestrator.cli import main
from tests.conftest import REPO
from tests.test_e2e import resurgence_cmd

SPECS = REPO / "search_spaces" / "detectors"


@pytest.mark.parametrize(
    ("name", "missing"),
    [
        ("nudity_nudenet.yaml", "model.config.path: "),
        ("objects_imagenet.yaml", "model.config.path: "),
    ],
)
def test_detector_specs_name_their_first_missing_input(name, missing, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/models, ~/data, ~/weights: none exist
    assert main(["validate", str(SPECS / name)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("resurgence: error: ")
    assert "~/" in err or str(tmp_path) in err, err  # it names the path it looked for


def smoke(spec: str, tmp_path, env) -> MlflowClient:
    (tmp_path / "search_spaces").symlink_to(REPO / "search_spaces")  # the smoke overrides' relative paths
    out = subprocess.run(
        [*resurgence_cmd(), "run", str(SPECS / spec), "--smoke-test", "--num-cpus", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def trial_runs(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == "trial"]
    assert len(runs) == 2
    return runs


def test_nudenet_smoke_sweep_records_its_evaluators(tmp_path, isolated_env):
    client = smoke("nudity_nudenet.yaml", tmp_path, isolated_env)
    exp = client.get_experiment_by_name("nudity-nudenet")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("stage") == "sweep")
    inputs = {d.dataset.name: d.dataset for d in parent.inputs.dataset_inputs}  # the prompt files, hashed
    assert set(inputs) == {
        "i2p_format_sample.csv (concept nudity)",
        "captions_sample.json (clip_score)",
        "captions_sample.json (fid)",
    }
    assert len(inputs["i2p_format_sample.csv (concept nudity)"].digest) == 32
    # the view the printed link opens: saved on the experiment by the sweep
    view = json.loads(exp.tags[f"mlflow.sharedViewState.{parent.data.tags['sweep']}"])
    assert view["searchFilter"] == f"tags.sweep = '{parent.data.tags['sweep']}' and tags.stage = 'trial'"
    assert (
        view["selectedColumns"][0] == "metrics.`resurgence`"
        and "params.`finetune.config.lr`" in view["selectedColumns"]
    )
    for run in trial_runs(client, "nudity-nudenet"):
        p, m = run.data.params, run.data.metrics
        assert p["evaluator.detector.name"] == "nudenet" and p["evaluator.detector.package"] == "nudenet==3.4.2"
        assert p["evaluator.detector.threshold"] == "0.6" and "FEMALE_BREAST_EXPOSED" in p["evaluator.detector.classes"]
        assert p["evaluator.detector.weights"].startswith("320n.onnx sha256:")
        assert p["evaluator.concepts.nudity.prompt_set.file"] == "i2p_format_sample.csv"
        assert len(p["evaluator.concepts.nudity.prompt_set.sha256"]) == 64
        assert p["evaluator.concepts.nudity.images"] == "2" and m["presence_images"] == 2
        assert (
            p["evaluator.utility.fid.reference_images"] == "8"
            and p["evaluator.utility.fid.weights"] == "random (seed 0)"
        )
        assert p["evaluator.utility.clip_score.model"] == "tiny-test"
        # a random tiny model draws no nudity: presence 0 before and after
        assert m["presence_base"] == 0 and m["presence_erased"] == 0 and m["presence"] == 0
        for key in ("clip_score", "clip_score_base", "fid", "fid_base"):
            assert key in m
        fid = client.get_metric_history(run.info.run_id, "fid")
        assert [h.step for h in fid] == [0, 4]  # after erasure, and at the round's end
        for key in ("trial_seconds", "trial_cpu_seconds", "trial_device_seconds", "trial_peak_rss_mb"):
            assert key in m
        assert m["trial_peak_rss_mb"] > 100 and m["trial_device_seconds"] == 0  # on the CPU


def test_imagenet_smoke_sweep_records_its_evaluator(tmp_path, isolated_env):
    client = smoke("objects_imagenet.yaml", tmp_path, isolated_env)
    for run in trial_runs(client, "objects-imagenet"):
        p, m = run.data.params, run.data.metrics
        assert p["evaluator.detector.name"] == "imagenet" and p["evaluator.detector.arch"] == "resnet18"
        assert p["evaluator.detector.decision"] == "top-1" and p["evaluator.detector.classes"] == "imagenette"
        assert p["evaluator.detector.weights"] == "random (seed 0)"
        assert p["evaluator.concepts.chain saw.images"] == "4" and m["presence_images"] == 4
        assert 0 <= m["presence"] <= 1 and 0 <= m["retention"] <= 1
