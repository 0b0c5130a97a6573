"""The spec is validated once per command, and each trial's resolved settings are built once, on the driver:
counted by a spy on the validating constructors inside every process of a real smoke sweep."""

from __future__ import annotations

import subprocess
from collections import Counter

import yaml
from mlflow import MlflowClient

from tests.conftest import REPO
from tests.inject import inject
from tests.spy import records
from tests.test_e2e import resurgence_cmd
from tests.test_faults import run_cli


def test_one_parse_per_command_and_one_resolved_object_per_trial(tmp_path, isolated_env):
    log = tmp_path / "validations.jsonl"
    env = inject(isolated_env, tmp_path / "site", {"orchestrator.spec": "tests.spy:watch"}, TEST_SPY_LOG=str(log))
    spec = REPO / "search_spaces" / "smoke.yaml"
    out = run_cli(tmp_path, env, "run", str(spec), "--smoke-test", "--num-cpus", "2")
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    trials = len(client.search_runs([experiment.experiment_id], "tags.stage = 'trial'"))
    assert trials == 2

    seen = records(str(log))
    assert len({r["pid"] for r in seen}) == 1, "a worker validated something: it should only read its trial"
    spec_checks = [r for r in seen if r["cls"] == "ExperimentSpec"]
    assert len(kinds(spec_checks, "parse")) == 1  # the spec itself (the smoke test's overrides applied), once
    # each bound of the search space once, where it differs from the spec's own value (that one is the parse)
    data = yaml.safe_load(spec.read_text())
    ft = {**data["finetune"]["config"], "steps": 10}  # the smoke test's overrides
    space = {**data["search"]["space"], "finetune.config.steps": {"choice": [5, 10]}}
    ends = [v for p, d in space.items() for v in next(iter(d.values())) if v != ft[p.rsplit(".", 1)[1]]]
    assert len(kinds(spec_checks, "bound")) == len(ends) == 4
    assert len(kinds(spec_checks, "trial")) == trials  # one resolved object per trial, nothing else per trial
    assert len(spec_checks) == 1 + len(ends) + trials

    # Component configs: each once at the parse; per trial only the one its values change (finetune.config).
    configs = [r for r in seen if r["cls"] != "ExperimentSpec"]
    names = ("TinyConfig", "ESDConfig", "ClipConfig", "GeneratedConfig", "FinetuneConfig", "EvalConfig")
    assert Counter(r["cls"] for r in kinds(configs, "parse")) == Counter(names)
    assert Counter(r["cls"] for r in kinds(configs, "trial")) == Counter({"FinetuneConfig": trials})
    assert all(k in ("parse", "bound", "trial") for k in map(kind, seen))


def kind(record: dict) -> str:
    """Why a validation ran, from the project functions on its stack."""
    callers = record["callers"]
    for name, why in (("resolve_trial", "trial"), ("_check_values", "bound"), ("_check_smoke", "smoke")):
        if name in callers:
            return why
    return "parse" if "parse_experiment" in callers else "other: " + " < ".join(callers)


def kinds(seen: list[dict], why: str) -> list[dict]:
    return [r for r in seen if kind(r) == why]


def test_validate_parses_the_spec_once(tmp_path, isolated_env):
    log = tmp_path / "validations.jsonl"
    env = inject(isolated_env, tmp_path / "site", {"orchestrator.spec": "tests.spy:watch"}, TEST_SPY_LOG=str(log))
    spec = REPO / "search_spaces" / "toy_resurgence.yaml"
    out = subprocess.run([*resurgence_cmd(), "validate", str(spec)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    seen = [r for r in records(str(log)) if r["cls"] == "ExperimentSpec"]
    assert len(kinds(seen, "parse")) == 1
    assert len(kinds(seen, "smoke")) == 1  # its smoke overrides, checked so that --smoke-test cannot fail late
    assert all(kind(r) in ("parse", "bound", "smoke") for r in seen)


def test_erase_cache_address_follows_the_prompt_files_a_method_reads(tmp_path):
    """MACE's prior captions (also inside meta): a file whose content changes is a new erasure, though the
    spec's text is the same."""
    import json

    from orchestrator.resolved import resolve

    captions = tmp_path / "captions.json"
    data = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
    contents = []
    for erase in (
        {"method": "mace", "config": {"prior": {"path": str(captions)}}},
        {"method": "meta", "config": {"method": "mace", "method_config": {"prior": {"path": str(captions)}}}},
    ):
        data["erase"] = erase
        for caption in ("a dog", "a cat"):
            captions.write_text(json.dumps({"annotations": [{"caption": caption}]}))
            contents.append(resolve(data, {}).erase_content())
    assert contents[0]["config"] == contents[1]["config"] and contents[0] != contents[1]
    assert contents[2]["config"] == contents[3]["config"] and contents[2] != contents[3]
    assert set(contents[2]["files"]) == {"method_config.prior"}
