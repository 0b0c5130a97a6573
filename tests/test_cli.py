"""Bad input: a one-line error naming the field, exit code 2, before Ray starts, and no MLflow run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main
from tests.conftest import REPO

SMOKE = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
SAMPLE_CSV = REPO / "search_spaces" / "data" / "i2p_format_sample.csv"
SAMPLE_CAPTIONS = REPO / "search_spaces" / "data" / "captions_sample.json"


def _spec(tmp_path, **changes):
    data = yaml.safe_load(yaml.safe_dump(SMOKE))
    for path, value in changes.items():
        node = data
        keys = path.split("__")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        if value is DELETE:
            node.pop(keys[-1])
        else:
            node[keys[-1]] = value
    out = tmp_path / "spec.yaml"
    out.write_text(yaml.safe_dump(data))
    return out


DELETE = object()

BAD = [
    ({"erase__method": "nope"}, "erase.method: unknown method 'nope' (known: esd, fewshot, mace, meta, none, uce)"),
    ({"model__name": "sd-99"}, "model.name: unknown model 'sd-99' (known: pretrained, tiny-sd, tiny-sdxl, toy)"),
    (
        {"evaluate__detector__name": "giphy"},
        "evaluate.detector.name: unknown detector 'giphy' (known: clip, imagenet, nudenet, toy)",
    ),
    ({"finetune__dataset__name": "coco"}, "finetune.dataset.name: unknown dataset 'coco' (known: concept, generated, "),
    ({"erase__config__iterations": "many"}, "erase.config.iterations: Input should be a valid integer"),
    ({"finetune__datasets": {"a": {"name": "toy"}}}, "finetune: give either dataset or datasets"),
    ({"finetune__data": "a"}, "finetune.data: only with datasets"),
    (
        {"erase__method": "meta", "erase__config": {"method": "esd", "method_config": {"eta": -2}}},
        "erase.config.method_config.eta: Input should be greater than or equal to 0",
    ),
    ({"erase__config__eta": -1}, "erase.config.eta: Input should be greater than or equal to 0"),
    ({"erase__config__etaa": 1}, "erase.config.etaa: Extra inputs are not permitted"),
    ({"finetune__config__lr": 0}, "finetune.config.lr: Input should be greater than 0"),
    ({"finetune__config__trainable": "everything"}, "finetune.config.trainable: Input should be"),
    ({"search__num_samples": 0}, "search.num_samples: Input should be greater than or equal to 1"),
    ({"search__mode": "up"}, "search.mode: Input should be 'max' or 'min'"),
    ({"finetune__eval_every": 1.5}, "finetune.eval_every: Input should be a valid integer"),
    ({"concept": DELETE}, "concept: Field required"),
    ({"erase_count": 2}, "erase_count: 2 is more than the 1 concepts in concept"),
    ({"concept": []}, "concept: give at least one concept to erase"),
    ({"concept__prompts": []}, "concept.prompts: List should have at least 1 item"),
    (
        {"finetune__dataset": {"name": "imagefolder", "config": {"path": "/no/such/dir"}}},
        "finetune.dataset.config.path: /no/such/dir: no such folder",
    ),
    (
        {"model": {"name": "pretrained", "config": {"path": "/no/such/model"}}},
        "model.config.path: /no/such/model: no such folder",
    ),
    (
        {"model": {"name": "pretrained", "config": {"path": "nobody/no-such-model"}}},
        "model.config.path: 'nobody/no-such-model' is neither a local folder nor in the HF cache (set allow_download",
    ),
    ({"search__space__finetune.config.lr": {"loguniform": [-1, 1]}}, "search.space.finetune.config.lr: "),
    (
        {"search__space__finetune.config.lr": {"uniform": [0.0, 1e-3]}},
        "search.space.finetune.config.lr: value 0.0 is invalid: finetune.config.lr: Input should be greater than 0",
    ),
    (
        {"search__space__finetune.config.optimizr": {"choice": ["sgd"]}},
        "search.space.finetune.config.optimizr: value 'sgd' is invalid: finetune.config.optimizr: Extra inputs",
    ),
    ({"search__space__search.seed": {"choice": [1]}}, "search.space.search.seed: only trial settings"),
    (
        {
            "distributed": {"workers": 2, "deepspeed": {"zero_optimization": {"stage": 2}}},
            "finetune__config__batch_size": 2,
            "search__space__finetune.config.batch_size": {"randint": [2, 9]},
        },
        "search.space.finetune.config.batch_size: with distributed.workers, search the batch size with choice",
    ),
    (
        {"smoke": {"finetune.config.steps": -1}},
        "smoke: with its overrides applied, finetune.config.steps: Input should be greater than or equal to 1",
    ),
    # a spec's `inputs` says where a file comes from: a refusal on that field (or inside it) ends with it
    (
        {
            "inputs": {"finetune.dataset": "photos from the moon (docs/moon.md)"},
            "finetune__dataset": {"name": "imagefolder", "config": {"path": "/no/such/dir"}},
        },
        "finetune.dataset.config.path: /no/such/dir: no such folder with a metadata.jsonl (got '/no/such/dir'); "
        "where it comes from: photos from the moon (docs/moon.md)",
    ),
    # the defender's floor: on what it is measured, and in its range
    (
        {"defender": {"space": {"erase.config.iterations": {"choice": [10, 20]}}, "utility": "clip_score"}},
        "defender.utility: clip_score needs evaluate.utility.clip_score",
    ),
    (
        {"defender": {"space": {"erase.config.iterations": {"choice": [10, 20]}}, "retention_floor": 2.0}},
        "defender.retention_floor: retention is a proportion (0-1), got 2.0",
    ),
    (
        {
            "others": [],
            "evaluate__detector__config__threshold": 0.5,
            "defender": {"space": {"erase.config.iterations": {"choice": [10, 20]}}, "retention_floor": 0.5},
        },
        "defender.retention_floor: retention is measured on `others` and this spec has none",
    ),
    # evaluator inputs (the prompt CSV, weights, classes, FID's reference folder) are checked the same way
    (
        {"concept__prompt_set": {"path": str(SAMPLE_CSV), "seed_column": "seed"}},
        f"concept.prompt_set.seed_column: {SAMPLE_CSV} has no column 'seed' (columns: prompt, categories, ",
    ),
    (
        {"concept__prompt_set": {"path": str(SAMPLE_CSV), "filter": "nudity_percentage > 99"}},
        f"concept.prompt_set.filter: 'nudity_percentage > 99' leaves no prompt of {SAMPLE_CSV}",
    ),
    (
        {"evaluate__detector": {"name": "imagenet", "config": {"weights": None, "arch": "resnet18"}}},
        "concept.name: 'circle' is not an ImageNet class name (map it in evaluate.detector.config.classes, by index",
    ),
    (
        {"evaluate__detector": {"name": "imagenet", "config": {"weights": "/no/such.safetensors"}}},
        "evaluate.detector.config.weights: /no/such.safetensors: no such file",
    ),
    (
        {
            "evaluate__utility": {
                "fid": {"prompts": {"path": str(SAMPLE_CAPTIONS)}, "reference": str(SAMPLE_CSV.parent), "weights": None}
            }
        },
        f"evaluate.utility.fid.reference: {SAMPLE_CSV.parent} has 0 images; FID needs at least as many as it ",
    ),
]


@pytest.mark.parametrize(("changes", "message"), BAD, ids=[next(iter(c)) for c, _ in BAD])
def test_bad_spec_exits_2_before_anything_runs(tmp_path, monkeypatch, capsys, changes, message):
    import ray

    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path, **changes)
    rc = main(["run", str(spec)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("resurgence: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not ray.is_initialized()
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "ray_results").exists()


def test_yaml_syntax_error(tmp_path, capsys):
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: x\nconcept: {name: a, prompts: [\n")
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "spec: YAML syntax error at line" in err and err.count("\n") == 1


def test_missing_spec_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: no such file" in capsys.readouterr().err


def test_bad_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path)
    assert main(["run", str(spec), "--tracking-uri", "ftp://x/y"]) == 2
    assert "--tracking-uri: unsupported scheme 'ftp'" in capsys.readouterr().err
    assert main(["run", str(spec), "--tracking-uri", f"sqlite:///{tmp_path}/no/such/dir/m.db"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", str(spec), "--address", "127.0.0.1:1"]) == 2
    assert "--address: nothing answers at 127.0.0.1:1" in capsys.readouterr().err
    assert main(["run", str(spec), "--address", "no-port"]) == 2
    assert "--address: expected auto, HOST:PORT" in capsys.readouterr().err
    assert main(["run", str(spec), "--num-cpus", "2", "--address", "auto"]) == 2
    assert "--num-cpus: sizes a local Ray only" in capsys.readouterr().err
    # `ray job submit` hands its entrypoint the cluster's address in RAY_ADDRESS: it counts as --address
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert main(["run", str(spec)]) == 2
    assert "RAY_ADDRESS: nothing answers at 127.0.0.1:1" in capsys.readouterr().err
    assert main(["run", str(spec), "--num-cpus", "2"]) == 2
    assert "(drop it when RAY_ADDRESS names a cluster)" in capsys.readouterr().err
    monkeypatch.delenv("RAY_ADDRESS")
    assert main(["run", str(_spec(tmp_path, resources={"cpu": 4})), "--num-cpus", "2"]) == 2
    assert "resources.cpu: a trial asks for 4 CPUs (1 worker(s)) but the local Ray has 2" in capsys.readouterr().err
    assert main(["run", str(spec), "--storage-path", "nope://bucket/x"]) == 2
    assert "storage_path: cannot open nope://bucket/x (Unrecognized filesystem" in capsys.readouterr().err
    assert main(["report", "no-such-experiment"]) == 2
    assert f"--tracking-uri: no MLflow store at {tmp_path / 'mlflow.db'}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["run", str(spec), "--num-samples", "0"])
    assert exc.value.code == 2
    assert not (tmp_path / "mlflow.db").exists()


def test_console_script_bad_input_has_no_traceback(tmp_path, isolated_env):
    spec = _spec(tmp_path, erase__method="nope")
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", str(spec)],
        cwd=tmp_path,
        env=isolated_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    known = "esd, fewshot, mace, meta, none, uce"
    assert out.stderr.strip() == f"resurgence: error: erase.method: unknown method 'nope' (known: {known})"
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("path", sorted((REPO / "search_spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_is_valid(path, capsys):
    assert main(["validate", str(path)]) == 0
    assert ": valid (" in capsys.readouterr().out


def test_validate_smoke_test_checks_the_smoke_variant(capsys, monkeypatch, tmp_path):
    """A real-model spec is refused for its missing inputs, and its smoke variant is valid as it is."""
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = str(REPO / "search_spaces" / "detectors" / "nudity_nudenet.yaml")
    assert main(["validate", spec]) == 2
    assert "concept.prompt_set.path: ~/data/i2p_benchmark.csv: no such file" in capsys.readouterr().err
    assert main(["validate", spec, "--smoke-test"]) == 0
    assert "valid (2 trials in 1 cell(s); model tiny-sd" in capsys.readouterr().out


def test_validate_and_list(capsys):
    assert main(["validate", str(REPO / "search_spaces" / "smoke.yaml")]) == 0
    assert "valid (4 trials in 1 cell(s)" in capsys.readouterr().out
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for line in (
        "methods:",
        "  esd ",
        "models:",
        "  tiny-sd ",
        "  pretrained ",
        "datasets:",
        "  parquet ",
        "detectors:",
        "  clip ",
        "presets: mace-celebrity, mace-explicit, mace-object, mace-style",
        "presets: meta-nudity, meta-nudity-as-run",
    ):
        assert line in out


def test_library_telemetry_off_unless_the_user_set_it(monkeypatch, capsys):
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "")  # recorded, so the environment is restored afterwards
    monkeypatch.delenv("RAY_USAGE_STATS_ENABLED")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")  # the user's own choice is kept
    assert main(["validate", str(REPO / "search_spaces" / "smoke.yaml")]) == 0
    assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"
    monkeypatch.delenv("MLFLOW_DISABLE_TELEMETRY")
    assert main(["validate", str(REPO / "search_spaces" / "smoke.yaml")]) == 0
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_smoke_test_and_flag_overrides(tmp_path, monkeypatch):
    from orchestrator.cli import parse_args, prepare

    monkeypatch.chdir(tmp_path)
    spec_path = str(REPO / "search_spaces" / "smoke.yaml")
    experiment, uri = prepare(parse_args(["run", spec_path, "--smoke-test"]))
    spec, data = experiment.spec, experiment.data
    assert spec.search.num_samples == 2 and spec.finetune.config["steps"] == 10
    assert spec.search.space["finetune.config.steps"].choice == [5, 10]  # a dotted key of search.space
    assert set(spec.search.space) == {"finetune.config.lr", "finetune.config.trainable", "finetune.config.steps"}
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert data["storage_path"] == str(tmp_path / "ray_results")  # absolute, for trials in other processes
    spec = prepare(parse_args(["run", spec_path, "--num-samples", "7", "--storage-path", "elsewhere"]))[0].spec
    assert spec.search.num_samples == 7 and spec.storage_path == str(tmp_path / "elsewhere")


def test_gpu_request_without_gpu(tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(_spec(tmp_path, resources={"cpu": 1, "gpu": 1}))]) == 2
    assert "resources.gpu: trials ask for 1 GPU(s) but this machine has 0" in capsys.readouterr().err


def test_summary_orders_best_first_errors_last():
    from orchestrator.attack import rank
    from orchestrator.spec import parse_spec

    def result(tid, value, error=None):
        return {"trial": tid, "resurgence": value, "config": {}, "error": error is not None}

    results = [result("a", 0.1), result("b", float("nan")), result("c", 0.5), result("d", 0.9, error="boom")]
    spec = parse_spec(SMOKE)
    assert [r["trial"] for r in rank(results, spec)] == ["c", "a", "b", "d"]
    spec = parse_spec({**SMOKE, "search": {**SMOKE["search"], "mode": "min"}})
    assert [r["trial"] for r in rank(results, spec)] == ["a", "c", "b", "d"]


def test_the_best_trials_table_names_grid_sections_short_and_gives_them_whole_under_it(capsys):
    from orchestrator.cli import print_table
    from orchestrator.spec import validate_structure  # the spec's shape only: no model folder needs to exist

    models = [
        {"name": "pretrained", "config": {"path": "~/models/stable-diffusion-v1-4/"}},
        {"name": "tiny-sd", "config": {"seed": 3}},
    ]
    erasers = [{"method": "uce", "config": {"preset": "uce-object"}}, {"method": "esd", "config": {}}]
    space = {"model": {"grid": models}, "erase": {"grid": erasers}, "finetune.config.lr": {"grid": [1e-4, 1e-3]}}
    spec = validate_structure({**SMOKE, "search": {**SMOKE["search"], "space": space}})
    rows = [
        {"trial": "t1", "resurgence": 0.5, "error": False, "config": {"model": models[1], "erase": erasers[0]}},
        {"trial": "t0", "resurgence": 0.25, "error": False, "config": {"model": models[0], "erase": erasers[1]}},
    ]
    for r, lr in zip(rows, (1e-4, 1e-3), strict=True):
        r["config"]["finetune.config.lr"] = lr
    print_table(rows, spec)
    lines = capsys.readouterr().out.strip().splitlines()
    assert "#0 uce/uce-object" in lines[2] and "#1 tiny-sd" in lines[2] and "0.0001" in lines[2]
    assert "#1 esd" in lines[3] and "#0 pretrained/stable-diffusion-v1-4" in lines[3] and "0.001" in lines[3]
    assert not any("{" in line for line in lines[:4])
    legend = [line.strip().split(": ", 1) for line in lines[4:]]
    assert [(key, json.loads(whole)) for key, whole in legend] == [
        ("erase #0", erasers[0]),
        ("erase #1", erasers[1]),
        ("model #0", models[0]),
        ("model #1", models[1]),
    ]  # the lr grid holds plain numbers: no legend


def test_resume_checks_the_ray_flags_before_anything_runs(tmp_path, capsys):
    import json

    import ray

    from orchestrator.resume import SweepState, spec_hash

    folder = tmp_path / "ray_results" / "smoke-1"
    folder.mkdir(parents=True)
    data = {**yaml.safe_load(yaml.safe_dump(SMOKE)), "resources": {"cpu": 4}}
    (folder / "spec.json").write_text(json.dumps(data))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    SweepState("smoke-1", "smoke.yaml", uri, None, spec_hash(data), "running", "now").save(folder)
    assert main(["resume", str(folder), "--num-cpus", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("resurgence: error: resources.cpu: a trial asks for 4 CPUs") and err.count("\n") == 1
    assert not ray.is_initialized() and not (tmp_path / "mlflow.db").exists()


def test_local_ray_starts_with_its_daemons_quieted_unless_the_user_set_them(monkeypatch):
    import ray

    from orchestrator.cli import QUIET_LOCAL_RAY, start_local_ray

    for name in QUIET_LOCAL_RAY:
        monkeypatch.setenv(name, "")  # recorded, so the environment is restored afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("REPORTER_UPDATE_INTERVAL_MS", "1234")  # the user's own choice is kept
    start_local_ray(num_cpus=1, configure_logging=False)
    try:
        # Ray's daemons read these at start-up: the log monitor's environment has them, as do the workers'
        monitor = ray._private.worker._global_node.all_processes["log_monitor"][0].process.pid
        environ = dict(
            line.split("=", 1) for line in Path(f"/proc/{monitor}/environ").read_text().split("\0") if "=" in line
        )
        worker_env = ray.get(ray.remote(lambda: dict(os.environ)).remote())
        for env in (environ, worker_env):
            assert env["RAY_LOG_MONITOR_MANY_FILES_THRESHOLD"] == "0"
            assert env["LOG_NAME_UPDATE_INTERVAL_S"] == "5"
            assert env["RAY_enable_metrics_collection"] == "false"
            assert env["REPORTER_UPDATE_INTERVAL_MS"] == "1234"
    finally:
        ray.shutdown()


def test_another_ray_version_is_refused_in_one_line_before_anything_runs(tmp_path, monkeypatch, capsys):
    """The Ray internals the project uses (orchestrator/ray_internals.py) were written for one Ray version."""
    import ray

    from orchestrator.ray_internals import WRITTEN_FOR, RayVersionError, raise_tune_idle_wait

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    with pytest.raises(RayVersionError, match=rf"written for Ray {WRITTEN_FOR}, but Ray 2\.61\.0 is installed"):
        raise_tune_idle_wait(1.0)
    spec = tmp_path / "smoke.yaml"
    spec.write_text(yaml.safe_dump(SMOKE))
    assert main(["run", str(spec), "--num-cpus", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"install ray[tune,default]=={WRITTEN_FOR}.*" in err
    assert not ray.is_initialized() and not (tmp_path / "mlflow.db").exists()


def test_a_spec_whose_presence_cannot_vary_is_refused(tmp_path, capsys):
    """The clip detector's argmax over the concept's name alone names the concept for every image: presence 1,
    resurgence 0 by construction. One more class (another concept, or an extra class) makes presence able to
    fall; the toy detector can say "none" and needs no second class."""
    lone = _spec(tmp_path, others=[])
    assert main(["validate", str(lone)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("resurgence: error: others: clip picks one of the class names") and "\n" not in err
    extra = _spec(tmp_path, others=[], evaluate__config__extra_classes=["a blank picture"])
    assert main(["validate", str(extra)]) == 0
    neutral = _spec(tmp_path, others=[], evaluate__detector__config__neutral=["a blank picture", "a texture"])
    assert main(["validate", str(neutral)]) == 0  # CLIP can answer a neutral class: presence can fall
    threshold = _spec(tmp_path, others=[], evaluate__detector__config__threshold=0.5)
    assert main(["validate", str(threshold)]) == 0
    capsys.readouterr()
    nude = _spec(tmp_path, evaluate__detector={"name": "nudenet", "config": {"concept": "circle"}})
    assert main(["validate", str(nude)]) == 2  # NudeNet cannot judge the others (retention)
    err = capsys.readouterr().err.strip()
    assert err == (
        "resurgence: error: others.0.name: 'square' is not what nudenet judges (only 'circle'): retention of "
        "other concepts needs a detector that knows them (use the utility metrics for what survives) (nudenet)"
    )
    toy = yaml.safe_load((REPO / "search_spaces" / "toy_resurgence.yaml").read_text())
    toy["others"] = []
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(toy))
    assert main(["validate", str(tmp_path / "toy.yaml")]) == 0


def test_silent_no_ops_are_refused_or_warned(tmp_path, capsys):
    """MACE replaces the concept's name in each prompt: a prompt without it would change nothing (refused,
    also through meta); meta-unlearning's related gammas with no related set act on nothing (a warning)."""
    for erase in ({"method": "mace", "config": {}}, {"method": "meta", "config": {"method": "mace"}}):
        spec = _spec(tmp_path, erase=erase, concept__prompts=["a circle", "a ring"])
        assert main(["validate", str(spec)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            "resurgence: error: concept.prompts: MACE replaces 'circle' in each of the concept's prompts by the "
            "mapping, and 'a ring' does not contain it (case matters): that prompt would change nothing"
        )
    assert main(["validate", str(_spec(tmp_path, erase={"method": "mace", "config": {}}))]) == 0
    capsys.readouterr()
    for guide, why in (("a red circle", "names the erased concept 'circle'"), ("  ", "tokenizes to nothing")):
        assert main(["validate", str(_spec(tmp_path, erase={"method": "uce", "config": {"guide": guide}}))]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"resurgence: error: erase.config.guide: {guide!r} ") and why in err and "\n" not in err
    assert main(["validate", str(_spec(tmp_path, erase={"method": "meta", "config": {}}))]) == 0
    err = capsys.readouterr().err
    assert err.startswith("resurgence: warning: erase.config: the related set is empty, so gamma1_2 and gamma2_2")
    related = {"method": "meta", "config": {"related": {"prompts": ["an ellipse"]}}}
    off = {"method": "meta", "config": {"gamma1_2": 0, "gamma2_2": 0}}
    for erase in (related, off):
        assert main(["validate", str(_spec(tmp_path, erase=erase))]) == 0
        assert "warning" not in capsys.readouterr().err


def test_presets_fill_official_recipes_and_refuse_what_they_lack(tmp_path, capsys):
    """`preset:` names an official recipe; an unknown name, or a recipe without what only the user can give
    (MACE's COCO captions, few-shot's real images), is refused in one line naming the field."""
    refused = [
        ({"method": "mace", "config": {"preset": "mace-ship"}}, "erase.config.preset: unknown recipe 'mace-ship' "),
        ({"method": "mace", "config": {"preset": "mace-celebrity"}}, "erase.config.prior: the mace-celebrity recipe"),
        ({"method": "fewshot", "config": {"preset": "fewshot"}}, "erase.config.image_folder: the fewshot recipe"),
        (
            {"method": "meta", "config": {"preset": "meta-nudity", "method_config": {"preset": "esd-y"}}},
            "erase.config.method_config.preset: unknown recipe 'esd-y'",
        ),
    ]
    for erase, want in refused:
        assert main(["validate", str(_spec(tmp_path, erase=erase))]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"resurgence: error: {want}") and "\n" not in err, err
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"annotations": [{"caption": "a dog on a sofa"}, {"caption": "two buses"}]}))
    for erase in (
        {"method": "mace", "config": {"preset": "mace-celebrity", "prior": {"path": str(coco)}}},
        {"method": "uce", "config": {"preset": "uce-paper"}},
        {"method": "esd", "config": {"preset": "esd-sdxl", "iterations": 3}},
    ):
        assert main(["validate", str(_spec(tmp_path, erase=erase))]) == 0, capsys.readouterr().err


def test_synonyms_are_erased_with_their_concept(tmp_path, capsys):
    """A synonym is erased as a concept of its own with the concept's prompts renamed (or bare); it may not
    repeat a concept's name."""
    from orchestrator.resolved import resolve
    from orchestrator.trial import erase_request_concepts

    data = yaml.safe_load(yaml.safe_dump(SMOKE))
    data["concept"]["prompts"] = ["a circle", "a red circle", "a ring"]
    data["concept"]["synonyms"] = ["disk", "round shape"]
    targets, preserve = erase_request_concepts(resolve(data, {}))
    assert [(c.name, c.prompts) for c in targets] == [
        ("circle", ["a circle", "a red circle", "a ring"]),
        ("disk", ["a disk", "a red disk"]),
        ("round shape", ["a round shape", "a red round shape"]),
    ]
    assert [c.name for c in preserve] == [c["name"] for c in data["others"]]
    assert main(["validate", str(_spec(tmp_path, concept__synonyms=[data["others"][0]["name"]]))]) == 2
    assert capsys.readouterr().err.startswith("resurgence: error: concept.synonyms: a synonym must differ")


def test_recipes_that_run_off_premise_warn(tmp_path, capsys):
    """Few-shot from images the model draws (not real photos), MACE at lamb 0 without a prior cache, and the
    same through meta-unlearning: each runs, with a warning naming what to give."""
    cases = [
        ({"method": "fewshot", "config": {}}, "erase.config: the concept's images are drawn by the base model"),
        ({"method": "mace", "config": {"lamb": 0}}, "erase.config: lamb 0 without a prior cache"),
        (
            {"method": "meta", "config": {"method": "fewshot", "related": {"prompts": ["a ring"]}}},
            "erase.config: method_config: the concept's images are drawn by the base model",
        ),
    ]
    for erase, want in cases:
        assert main(["validate", str(_spec(tmp_path, erase=erase))]) == 0
        assert capsys.readouterr().err.startswith(f"resurgence: warning: {want}")


def test_warnings_of_erase_sections_in_a_grid(capsys):
    """A grid of erase sections warns for each section as the spec's own erase section would."""
    spec = str(REPO / "search_spaces" / "papers" / "fewshot_erasure.yaml")
    assert main(["validate", spec, "--smoke-test"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1  # the few-shot cell draws its images; the ESD cell has nothing to say
    assert err[0].startswith("resurgence: warning: search.space.erase[0]: erase.config: the concept's images are")
