"""The three papers' experiments as shipped specs (search_spaces/papers/): `resurgence validate` refuses each in
one line naming the first missing input and where it comes from, and is satisfied once the test has created
every input the spec lists; each spec's smoke test runs end to end with no external file."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from orchestrator.cli import main
from tests.conftest import REPO
from tests.test_e2e import resurgence_cmd

PAPERS = REPO / "search_spaces" / "papers"
SPECS = sorted(p.name for p in PAPERS.glob("*.yaml"))


def test_every_paper_has_its_specs():
    assert SPECS == [
        "concept_resurgence.yaml",
        "fewshot_erasure.yaml",
        "meta_unlearning.yaml",
        "meta_unlearning_defender.yaml",
        "meta_unlearning_sdxl.yaml",
    ]


def _image_folder(folder: Path, captions: list[str]) -> None:
    folder.mkdir(parents=True)
    lines = []
    for i, caption in enumerate(captions):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def _resnet50_weights(path: Path) -> None:
    import torchvision
    from safetensors.torch import save_file

    net = torchvision.models.resnet50(weights=None)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def create(field: str, path: Path, spec: dict) -> None:
    """The input a refusal on `field` asks for, at `path`: small, but of the kind the field checks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if field.endswith("model.config.path"):
        name = "StableDiffusionXLPipeline" if "xl" in path.name else "StableDiffusionPipeline"
        path.mkdir()
        (path / "model_index.json").write_text(json.dumps({"_class_name": name}))
    elif field.endswith("prompt_set.path"):
        shutil.copy(REPO / "search_spaces" / "data" / "i2p_format_sample.csv", path)
    elif field.endswith(("prior.path", "prompts.path")):
        shutil.copy(REPO / "search_spaces" / "data" / "captions_sample.json", path)
    elif field.endswith("image_folder"):
        for grid in spec["search"]["space"]["concept"]["grid"]:
            _image_folder(path / grid["name"], [f"a photo of a {grid['name']}"] * 2)
    elif ".config.path" in field:  # an imagefolder dataset
        _image_folder(path, ["a photo of someone", "a photo of something"])
    elif field.endswith("detector.config.weights"):
        _resnet50_weights(path)
    elif field.endswith("pretrained"):  # an open_clip checkpoint file: validation needs it to exist
        path.write_bytes(b"\0")
    else:
        raise AssertionError(f"no input of this kind: {field}")


@pytest.mark.parametrize("name", SPECS)
def test_validate_names_each_missing_input_and_where_it_comes_from(name, capsys, monkeypatch, tmp_path):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))  # ~/models, ~/data, ~/weights: none exist yet
    monkeypatch.chdir(REPO)  # relative paths (cluster/deepspeed) as from a checkout
    spec = yaml.safe_load((PAPERS / name).read_text())
    inputs = spec["inputs"]
    asked: list[str] = []
    for _ in range(12):
        rc = main(["validate", str(PAPERS / name)])
        out, err = capsys.readouterr()
        if rc == 0:
            assert "valid" in out
            break
        assert rc == 2
        err = err.strip()
        assert err.count("\n") == 0 and err.startswith("resurgence: error: "), err
        message = err.removeprefix("resurgence: error: ")
        field = message.split(" is invalid: ")[-1].split(": ", 1)[0]
        # it names where the input comes from: the spec's own entry for that field (or the section holding it)
        key = max((k for k in inputs if field == k or field.startswith(k + ".")), key=len, default=None)
        assert key is not None, f"{name}: a refusal on {field} that `inputs` does not cover: {message}"
        assert message.endswith(f"; where it comes from: {inputs[key]}")
        paths = re.findall(rf"(?:~|{re.escape(str(home))})/[\w./-]+", message)
        assert paths, message  # it names the path it looked for
        target = Path(paths[0].replace("~", str(home), 1))
        assert not target.exists()
        create(field, target, spec)
        asked.append(key)
    else:
        raise AssertionError(f"{name}: still refused after creating {asked}")
    assert set(asked) == set(inputs), f"{name}: `inputs` lists {set(inputs) - set(asked)} that nothing checks"


SMOKE_FAST = [s for s in SPECS if s != "meta_unlearning_sdxl.yaml"]


def _smoke(name: str, tmp_path: Path, env: dict) -> tuple[MlflowClient, str]:
    for folder in ("search_spaces", "cluster"):  # the smoke overrides' relative paths
        (tmp_path / folder).symlink_to(REPO / folder)
    out = subprocess.run(
        [*resurgence_cmd(), "run", str(PAPERS / name), "--smoke-test", "--num-cpus", "2"],
        cwd=tmp_path,
        env={**env, "HOME": str(tmp_path / "home")},  # no ~/models, ~/data or ~/weights at all
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), out.stdout


def _check_trials(client: MlflowClient, experiment: str, cells: int) -> list:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags.get("stage") == "trial"]
    assert len(trials) == cells and all(t.info.status == "FINISHED" for t in trials)
    for t in trials:  # every trial measured presence with its interval and n, and its erase time
        m = t.data.metrics
        assert m["presence_images"] >= 1 and m["presence_lo"] <= m["presence"] <= m["presence_hi"]
        assert m["resurgence_lo"] <= m["resurgence"] <= m["resurgence_hi"] and m["erase_seconds"] > 0
    return trials


@pytest.mark.parametrize("name", SMOKE_FAST)
def test_paper_spec_smoke_runs_with_no_external_file(name, tmp_path, isolated_env):
    spec = yaml.safe_load((PAPERS / name).read_text())
    client, stdout = _smoke(name, tmp_path, isolated_env)
    if "defender" in spec:  # 2 candidates x 1 attack, each candidate floored by the CLIP score
        runs = client.search_runs([client.get_experiment_by_name(spec["name"]).experiment_id])
        candidates = [r for r in runs if r.data.tags.get("stage") == "defender-candidate"]
        assert len(candidates) == 2 and all(c.data.tags["utility"] == "clip_score" for c in candidates)
        _check_trials(client, spec["name"], 2)
        return
    smoke = spec["smoke"]
    grids = [
        d["grid"]
        for d in (
            smoke.get(f"search.space.{k}") or spec["search"]["space"].get(k)
            for k in ("model", "erase", "erase_count", "concept")
        )
        if d and "grid" in d
    ]
    cells = 1
    for grid in grids:
        cells *= len(grid)
    trials = _check_trials(client, spec["name"], cells)
    methods = {t.data.tags["method"] for t in trials}
    expected = {e["method"] for e in (smoke.get("search.space.erase") or spec["search"]["space"]["erase"])["grid"]}
    assert methods == expected  # every erasure cell ran
    # The console's table names each erase section by its place in the grid; the legend under it gives it whole.
    table = stdout[stdout.index("Best trials by") : stdout.index("MLflow:")].strip().splitlines()
    erase = (smoke.get("search.space.erase") or spec["search"]["space"]["erase"])["grid"]
    legend = [line.strip().split(": ", 1) for line in table if re.match(r"\s+[\w.]+ #\d+: ", line)]
    assert [json.loads(whole) for key, whole in legend if key.startswith("erase #")] == erase
    rows = table[2 : len(table) - len(legend)]
    assert len(rows) == min(cells, 10) and not any("{" in row for row in rows), rows
    assert all(any(f"#{i} {e['method']}" in row for row in rows) for i, e in enumerate(erase)), rows


@pytest.mark.slow  # two DeepSpeed trials of two CPU workers each: about 3 minutes on 2 cores
def test_sdxl_paper_spec_smoke_runs_under_deepspeed(tmp_path, isolated_env):
    client, _ = _smoke("meta_unlearning_sdxl.yaml", tmp_path, isolated_env)
    trials = _check_trials(client, "paper-meta-unlearning-sdxl", 2)
    assert all(t.data.params["distributed.workers"] == "2" for t in trials)
    assert {t.data.tags["method"] for t in trials} == {"esd", "meta"}
