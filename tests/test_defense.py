"""The defender loop on the toy world with tiny budgets (`toy_defense.yaml --smoke-test`): two
meta-unlearning candidates, each erased once and attacked by its own attacker search; the outer study,
MLflow's candidate runs and the defender config with its worst case (the concept's presence at the attacks'
peak). Both objectives: the
worst case under a retention floor (TPE with a constraint) and the Pareto search (NSGA-II)."""

import json
import math
import subprocess

import optuna
import pytest
import yaml
from mlflow import MlflowClient

from orchestrator.defender import defender_study
from orchestrator.spec import parse_spec
from tests.conftest import REPO
from tests.test_e2e import resurgence_cmd


@pytest.mark.parametrize("objective", ["worst_case", pytest.param("pareto", marks=pytest.mark.slow)])
def test_defender_loop_on_the_toy_world(tmp_path, isolated_env, objective):
    data = yaml.safe_load((REPO / "search_spaces" / "toy_defense.yaml").read_text())
    data["defender"]["objective"] = objective
    spec = tmp_path / "toy_defense.yaml"
    spec.write_text(yaml.safe_dump(data))
    out = subprocess.run(
        [*resurgence_cmd(), "run", str(spec), "--smoke-test", "--num-cpus", "2"],
        cwd=tmp_path,
        env=isolated_env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "[defender] 2/2 candidates attacked; best: candidate" in out.stdout
    assert f"Defender candidates ({objective};" in out.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("toy-defense")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("stage") == "defense")
    candidates = {r.info.run_id: r for r in runs if r.data.tags.get("stage") == "defender-candidate"}
    trials = [r for r in runs if r.data.tags.get("stage") == "trial"]
    assert len(candidates) == 2 and len(trials) == 2  # 2 candidates x an attack budget of 1 trial
    for c in candidates.values():
        assert c.data.tags["mlflow.parentRunId"] == parent.info.run_id and c.info.status == "FINISHED"
        assert {"defender.erase.config.gamma2_1", "defender.erase.config.gamma1_1"} <= set(c.data.params)
        assert {"worst_presence", "worst_resurgence", "retention", "feasible"} <= set(c.data.metrics)
        assert c.data.tags["score"] == "presence"
    for t in trials:  # every attack sits under its candidate and ran on that candidate's erasure settings
        c = candidates[t.data.tags["mlflow.parentRunId"]]
        assert t.data.tags["candidate"] == c.data.tags["candidate"]
        for key in ("erase.config.gamma2_1", "erase.config.gamma1_1"):
            assert math.isclose(float(t.data.params[key]), float(c.data.params[f"defender.{key}"]))
        assert "erase.config.gamma2_1" in json.loads(t.data.tags["searched"])
        worst = c.data.metrics["worst_resurgence"]  # one attack: its peak resurgence is the worst case
        peak = max(m.value for m in client.get_metric_history(t.info.run_id, "resurgence"))
        assert math.isclose(worst, peak)
        # the defender's score: the concept's presence at that peak (what the attack reached, not its rise)
        assert math.isclose(c.data.metrics["worst_presence"], peak + t.data.metrics["presence_erased"])
        assert "resurgence_proxy" in t.data.metrics  # the rungs' cheap signal

    # the defender config and its worst-case resurgence on the parent run
    best = parent.data.params["best.candidate"]
    chosen = next(c for c in candidates.values() if c.data.tags["candidate"] == best)
    assert chosen.data.metrics["feasible"] == 1.0
    assert parent.data.metrics["best_worst_presence"] == chosen.data.metrics["worst_presence"]
    for key in ("erase.config.gamma2_1", "erase.config.gamma1_1"):
        assert parent.data.params[f"best.{key}"] == chosen.data.params[f"defender.{key}"]
    assert parent.data.metrics["erase_cache_miss"] == 2  # one erasure per candidate

    # the outer study persisted beside the sweep: both candidates told, with their worst case as the value
    sweep = parent.data.tags["sweep"]
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "ray_results" / sweep / "defender.journal"))
    )
    study = optuna.load_study(study_name=f"{sweep}-defender", storage=storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    worst = sorted(c.data.metrics["worst_presence"] for c in candidates.values())
    if objective == "pareto":  # NSGA-II on two objectives: worst resurgence down, retention up
        assert study.directions == [optuna.study.StudyDirection.MINIMIZE, optuna.study.StudyDirection.MAXIMIZE]
        sampler = defender_study(parse_spec(data), tmp_path / "probe.journal", "probe").sampler
        assert isinstance(sampler, optuna.samplers.NSGAIISampler)  # what the sweep asked its candidates from
        assert sorted(t.values[0] for t in done) == worst
        assert sorted(t.values[1] for t in done) == sorted(c.data.metrics["retention"] for c in candidates.values())
    else:
        assert sorted(t.value for t in done) == worst
    for t in done:  # the retention floor reached both samplers as a constraint (<= 0: feasible)
        floor = 0.5  # the smoke's floor
        assert math.isclose(t.constraints["retention_floor"], floor - candidate_retention(candidates, t.params))
    assert (tmp_path / "reports" / sweep / "pareto.png").is_file()


def candidate_retention(candidates: dict, params: dict) -> float:
    """The retention MLflow holds for the candidate run with these defender values."""
    for c in candidates.values():
        if all(math.isclose(float(c.data.params[f"defender.{k}"]), v) for k, v in params.items()):
            return c.data.metrics["retention"]
    raise AssertionError(f"no candidate run with {params}")


def test_candidates_are_scored_by_the_presence_their_attacks_reached():
    """A candidate that erased nothing cannot resurge (its presence has no room to rise): scored by resurgence
    it would win; scored by the presence the attacks reached (the default) it loses."""
    from orchestrator.defender import candidate_score

    def row(erased: float, peak: float) -> dict:
        return {"presence_erased": erased, "peak_resurgence": peak, "retention_erased": 0.9, "clip_score_erased": 30.0}

    untouched = [row(1.0, 0.0), row(1.0, -0.25)]
    erased = [row(0.1, 0.3), row(0.1, 0.05)]
    assert candidate_score(untouched) == (1.0, 0.0, 0.9)
    presence, resurgence, retention = candidate_score(erased)
    assert presence == pytest.approx(0.4) and resurgence == pytest.approx(0.3) and retention == 0.9
    assert candidate_score(erased)[0] < candidate_score(untouched)[0]  # presence: the eraser is the better defence
    assert candidate_score(erased)[1] > candidate_score(untouched)[1]  # resurgence alone: the reverse
    assert candidate_score(erased, "clip_score")[2] == 30.0  # the floor reads the utility it is asked for
