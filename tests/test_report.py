"""`resurgence report`: a real MLflow store with a synthetic attacker sweep and a defender search, read back
into Parquet, PNGs and an HTML page that a real (headless) Chromium loads."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from PIL import Image

from methods.evaluation.intervals import newcombe
from orchestrator.formatting import with_interval
from orchestrator.report import importances, write_report
from orchestrator.spec import SpecError

SWEEP = "toy-resurgence-20261125-183000"
OLD_SWEEP = "toy-resurgence-20261124-090000"
DEFENSE = "toy-defense-20261126-120000"
SEARCHED = ["finetune.config.lr", "finetune.config.trainable"]
STEPS = [0, 10, 20, 30]  # ft_step of each evaluation
LRS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3]
PLOTS = ("curves.png", "hyperparameters.png", "importance.png")
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
EVALUATOR = {
    "evaluator.detector.name": "toy",
    "evaluator.detector.weights": "sha256:aaaa",
    "evaluator.detector.decision": "shape p>=0.5",
    "evaluator.sampling.steps": "20",
}


def resurgence_at(step: int, lr: float, trainable: str) -> float:
    """A made-up curve: grows with log lr, much more than with trainable."""
    strength = (math.log10(lr) + 6) / 4 + (0.05 if trainable == "full" else 0.0)
    return round(strength * step / STEPS[-1], 6)


class Store:
    """Writes runs in the layout the sweep's tracker produces."""

    def __init__(self, root: Path) -> None:
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.root = root
        self.client = MlflowClient(self.uri)
        self.clock = 1_760_000_000_000  # ms; each run starts a second after the last

    def experiment(self, name: str) -> str:
        return self.client.create_experiment(name, artifact_location=str(self.root / "artifacts" / name))

    def run(self, exp: str, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        self.clock += 1000
        tags = {**tags, "mlflow.runName": name, **({"mlflow.parentRunId": parent} if parent else {})}
        return self.client.create_run(exp, start_time=self.clock, tags=tags, run_name=name).info.run_id

    def log(self, run_id: str, params: dict[str, str], metrics: list[tuple[str, float, int]]) -> None:
        self.client.log_batch(
            run_id,
            params=[Param(k, v) for k, v in params.items()],
            metrics=[Metric(k, v, self.clock + i, s) for i, (k, v, s) in enumerate(metrics)],
        )

    def trial(
        self,
        exp: str,
        sweep: str,
        parent: str,
        trial_id: str,
        lr: float,
        trainable: str,
        steps: list[int] = STEPS,
        status: str = "FINISHED",
        candidate: str | None = None,
        evaluator: dict[str, str] | None = None,
    ) -> str:
        tags = {
            "stage": "trial",
            "sweep": sweep,
            "trial_id": trial_id,
            "method": "esd",
            "concept": "cross",
            "model": "toy",
            "searched": json.dumps(SEARCHED),
            **({"candidate": candidate} if candidate else {}),
        }
        run_id = self.run(exp, f"trial-{trial_id}", tags, parent)
        params = {
            "finetune.config.lr": str(lr),
            "finetune.config.trainable": trainable,
            "erase.method": "esd",
            "concept.name": "cross",
            **(EVALUATOR if evaluator is None else evaluator),
        }
        # Steps logged out of order (last step before the middle ones): "final" must mean last by step.
        order = steps[:1] + steps[-1:] + steps[1:-1] if len(steps) > 2 else steps
        metrics = [("resurgence", resurgence_at(s, lr, trainable), s) for s in order]
        metrics += [("ft_loss", 1.0 / (1 + s), s) for s in order]
        once = {"presence_base": 0.9, "presence_erased": 0.1, "erase_seconds": 2.5, "trial_seconds": 12.0}
        metrics += [(k, v, 0) for k, v in once.items()]
        self.log(run_id, params, metrics)
        grid = self.root / "samples.png"  # a 16-px image per cell, as the toy world's trials log it
        Image.new("RGB", (90 + 2 * 16, 14 + 3 * 16), (200, 30, 30)).save(grid)
        self.client.log_artifact(run_id, str(grid))
        self.client.set_terminated(run_id, status)
        return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    """Experiment "toy": an old sweep of one trial, then a sweep of 12 trials (lr x trainable) and a failed
    one. Experiment "defended": a defense of 4 candidates (number 3 infeasible) with 2 trials each. Experiment
    "empty": a sweep parent without trials."""
    s = Store(tmp_path_factory.mktemp("mlflow"))
    toy = s.experiment("toy")
    old = s.run(toy, OLD_SWEEP, {"stage": "sweep", "sweep": OLD_SWEEP})
    # The old sweep was measured with other detector weights: its figures are not comparable with the new one's.
    s.trial(
        toy,
        OLD_SWEEP,
        old,
        "old00000",
        1e-4,
        "attn",
        evaluator={**EVALUATOR, "evaluator.detector.weights": "sha256:bbbb"},
    )
    parent = s.run(toy, SWEEP, {"stage": "sweep", "sweep": SWEEP})
    n = 0
    for lr in LRS:
        for trainable in ("attn", "full"):
            s.trial(toy, SWEEP, parent, f"t{n:04d}", lr, trainable)
            n += 1
    s.trial(toy, SWEEP, parent, "failed00", 1e-2, "full", steps=[0, 10], status="FAILED")

    defended = s.experiment("defended")
    dparent = s.run(defended, DEFENSE, {"stage": "defense", "sweep": DEFENSE})
    outcomes = {0: (0.40, 0.90, 1.0), 1: (0.20, 0.80, 1.0), 2: (0.30, 0.70, 1.0), 3: (0.05, 0.95, 0.0)}
    for number, (worst, retention, feasible) in outcomes.items():
        tags = {"stage": "defender-candidate", "sweep": DEFENSE, "candidate": str(number)}
        cand = s.run(defended, f"candidate-{number}", tags, dparent)
        params = {"defender.erase.config.iterations": str(10 * (number + 1)), "defender.erase.config.lr": "1e-05"}
        metrics = [("worst_resurgence", worst, 0), ("retention", retention, 0), ("feasible", feasible, 0)]
        s.log(cand, params, metrics)
        for k, lr in enumerate((1e-4, 1e-3)):
            # Candidate 0's trials were evaluated with 10 sampling steps, the others' with 20.
            evaluator = {**EVALUATOR, "evaluator.sampling.steps": "10" if number == 0 else "20"}
            s.trial(defended, DEFENSE, cand, f"c{number}t{k}", lr, "attn", candidate=str(number), evaluator=evaluator)
        s.client.set_terminated(cand, "FINISHED")

    empty = s.experiment("empty")
    s.run(empty, "lonely", {"stage": "sweep", "sweep": "lonely"})
    return s


@pytest.fixture(scope="module")
def sweep_report(store: Store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(store.uri, "toy", tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def defense_report(store: Store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(store.uri, "defended", tmp_path_factory.mktemp("defense"))


def test_parquet_has_one_row_per_trial_with_typed_columns_and_curves(sweep_report: Path) -> None:
    table = pq.read_table(sweep_report.parent / "trials.parquet")
    rows = {row["trial_id"]: row for row in table.to_pylist()}
    assert len(rows) == 13 and "old00000" not in rows  # the newest sweep only
    schema = table.schema
    assert schema.field("finetune.config.lr").type == pa.float64()
    assert schema.field("finetune.config.trainable").type == pa.string()
    assert schema.field("final.resurgence").type == pa.float64()
    assert schema.field("curve.resurgence.step").type == pa.list_(pa.int64())
    assert schema.field("curve.resurgence.value").type == pa.list_(pa.float64())
    for name in ("run_id", "status", "method", "concept", "model", "candidate", "presence_base", "erase_seconds"):
        assert name in schema.names
    for once in ("presence_base", "trial_seconds"):  # logged once: a column as logged, not a curve
        assert schema.field(once).type == pa.float64()
        assert f"final.{once}" not in schema.names and f"curve.{once}.step" not in schema.names

    row = rows["t0009"]  # lr 1e-3, trainable full
    assert row["finetune.config.lr"] == 1e-3 and row["finetune.config.trainable"] == "full"
    assert row["curve.resurgence.step"] == STEPS
    assert row["curve.resurgence.value"] == [resurgence_at(s, 1e-3, "full") for s in STEPS]
    assert row["final.resurgence"] == resurgence_at(STEPS[-1], 1e-3, "full")  # logged before steps 10 and 20
    assert row["final.ft_loss"] == pytest.approx(1 / 31)
    assert row["presence_base"] == 0.9 and row["trial_seconds"] == 12.0
    assert row["candidate"] is None and row["method"] == "esd"

    failed = rows["failed00"]
    assert failed["status"] == "FAILED" and failed["curve.resurgence.step"] == [0, 10]


def test_plots_are_pngs_and_pareto_only_for_a_defense(sweep_report: Path, defense_report: Path) -> None:
    for folder, plots in ((sweep_report.parent, PLOTS), (defense_report.parent, (*PLOTS, "pareto.png"))):
        for name in plots:
            with Image.open(folder / name) as image:
                assert image.format == "PNG" and image.width >= 400 and image.height >= 200
                image.verify()
            assert (folder / name).stat().st_size > 10_000  # drawn, not a blank canvas
    assert not (sweep_report.parent / "pareto.png").exists()


def test_page_lists_best_trials_and_candidates(sweep_report: Path, defense_report: Path) -> None:
    page = sweep_report.read_text()
    assert "13 trials: 12 finished, 1 failed" in page
    best = page[page.index("<table>") : page.index("</table>")]  # the first table (images hold base64 text)
    assert best.count("<tr>") == 11  # header and the best 10
    assert best.index("t0011") < best.index("t0010") < best.index("t0009")  # lr 3e-3 full, attn, then 1e-3 full
    assert "t0000" not in best and "failed00" not in best  # the lowest (1e-5 attn) and the failed (at step 10)

    defense = defense_report.read_text()
    assert "Defender candidates" in defense
    # Candidate 3 dominates but is infeasible: the best feasible is 1 (worst resurgence 0.2).
    assert "Best feasible candidate: <b>1</b>" in defense
    assert "erase.config.iterations" in defense
    table = pq.read_table(defense_report.parent / "trials.parquet").to_pylist()
    assert sorted(r["candidate"] for r in table) == ["0", "0", "1", "1", "2", "2", "3", "3"]


def test_importance_ranks_the_hyperparameter_that_drives_resurgence(sweep_report: Path) -> None:
    rows = pq.read_table(sweep_report.parent / "trials.parquet").to_pylist()
    found = importances(rows, SEARCHED)
    assert isinstance(found, dict) and set(found) == set(SEARCHED)
    assert found["finetune.config.lr"] > 0.8 > found["finetune.config.trainable"]


def test_files_are_logged_to_the_parent_run(store: Store, sweep_report: Path) -> None:
    parent = store.client.search_runs(
        [store.client.get_experiment_by_name("toy").experiment_id], f"tags.sweep = '{SWEEP}' and tags.stage = 'sweep'"
    )[0]
    logged = {Path(a.path).name for a in store.client.list_artifacts(parent.info.run_id, "report")}
    pictures = {p.name for p in sweep_report.parent.glob("*.png") if p.name.startswith(("samples-", "curve-"))}
    assert len(pictures) == 6 and logged == {"trials.parquet", "index.html", *PLOTS, *pictures}


def test_named_sweep_and_a_skipped_importance(store: Store, tmp_path: Path) -> None:
    index = write_report(store.uri, "toy", tmp_path, sweep=OLD_SWEEP, log_to_parent=False)
    assert pq.read_table(tmp_path / "trials.parquet").column("trial_id").to_pylist() == ["old00000"]
    assert not (tmp_path / "importance.png").exists()
    assert "Importance needs at least 2 finished trials" in index.read_text()


@pytest.mark.parametrize(
    ("experiment", "sweep", "message"),
    [
        ("nope", None, "experiment: no MLflow experiment named 'nope' at sqlite:///"),
        ("toy", "nope", f"--sweep: experiment 'toy' has no sweep named 'nope' (known: {OLD_SWEEP}, {SWEEP})"),
        ("empty", None, "--sweep: sweep 'lonely' of experiment 'empty' has no trial runs yet"),
    ],
)
def test_user_errors_are_one_line(store: Store, tmp_path: Path, experiment: str, sweep: str | None, message: str):
    with pytest.raises(SpecError) as err:
        write_report(store.uri, experiment, tmp_path, sweep=sweep)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())  # nothing written


def test_missing_store_is_not_created(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="--tracking-uri: no MLflow store at"):
        write_report(f"sqlite:///{tmp_path / 'typo.db'}", "toy", tmp_path / "out")
    assert not (tmp_path / "typo.db").exists()


def chrome(tmp_path: Path, *flags: str):
    """A headless Chromium with its own profile under tmp_path (removed by the test's finally)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
        *flags,
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()), reason=f"needs {CHROMIUM} and {CHROMEDRIVER}")
def test_page_loads_in_a_headless_browser(defense_report: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = chrome(tmp_path)
    try:
        driver.set_page_load_timeout(30)
        driver.get(defense_report.as_uri())
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) == 4 + 2 * 3  # the plots, then a sample grid and curves for each of the best 3
        for img in images:
            loaded = driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
            assert loaded > 0, img.get_attribute("alt")
            assert img.get_attribute("alt")
        grids = driver.find_elements(By.CSS_SELECTOR, "img.grid")
        assert len(grids) == 3
        for grid in grids:  # a small grid upscaled to >= 480 px, and shown at least 24em wide
            assert driver.execute_script("return arguments[0].naturalWidth", grid) >= 480
            assert grid.size["width"] >= 300
        driver.save_screenshot(str(tmp_path / "report.png"))
        links = [a.get_attribute("href") for a in driver.find_elements(By.TAG_NAME, "a")]
        assert any(link.endswith("trials.parquet") for link in links)
        for link in links:
            assert urlparse(link).scheme == "file" and Path(unquote(urlparse(link).path)).is_file(), link
        assert driver.title == f"resurgence report: defended / {DEFENSE}"
        text = driver.find_element(By.TAG_NAME, "body").text
        trials = pq.read_table(defense_report.parent / "trials.parquet").to_pylist()
        best = max(trials, key=lambda r: r["final.resurgence"])
        assert best["trial_id"] in text and "Best feasible candidate: 1" in text
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium", ignore_errors=True)


def test_best_trials_pictures_and_evaluators(sweep_report: Path, defense_report: Path) -> None:
    page = sweep_report.read_text()
    trials = pq.read_table(sweep_report.parent / "trials.parquet").to_pylist()
    best = sorted((r for r in trials if r["final.resurgence"] is not None), key=lambda r: -r["final.resurgence"])[:3]
    for row in best:  # the grid fetched from the trial's run, upscaled without smoothing; its own curve
        grid = Image.open(sweep_report.parent / f"samples-{row['trial_id']}.png")
        assert grid.width == 4 * 122 and grid.getpixel((grid.width - 5, grid.height - 5)) == (200, 30, 30)
        assert (sweep_report.parent / f"curve-{row['trial_id']}.png").is_file()
        assert f"#{best.index(row) + 1} {row['trial_id']}" in page
    # Every trial of the sweep shares its evaluator: a table, no warning within the sweep; the old sweep
    # used other detector weights: named, with the differing param.
    assert "What measured these trials" in page and "sha256:aaaa" in page
    assert "were not all measured the same way" not in page
    assert f"Sweep <b>{OLD_SWEEP}</b> of this experiment was measured differently (1 evaluator params differ)" in page
    assert "evaluator.detector.weights</td><td>sha256:aaaa</td><td>sha256:bbbb" in page
    dpage = defense_report.read_text()
    assert "The trials of this sweep were not all measured the same way" in dpage
    assert "evaluator.sampling.steps</td><td>10 / 20" in dpage


@pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()), reason=f"needs {CHROMIUM} and {CHROMEDRIVER}")
def test_the_printed_mlflow_link_opens_the_sweeps_runs(store: Store, tmp_path: Path) -> None:
    """MLflow 3.17's UI, served by `mlflow ui`, opened at the link the command prints: the runs view (not the
    GenAI traces page) with the sweep's trial runs only, and the resurgence column shown."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time as clock

    from selenium.webdriver.common.by import By

    from orchestrator.store import runs_url, runs_view

    exp_id = store.client.get_experiment_by_name("toy").experiment_id
    store.client.set_experiment_tag(exp_id, *runs_view(SWEEP, "resurgence", "max", SEARCHED))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "ui",
            "--backend-store-uri",
            store.uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job-runner processes
        start_new_session=True,  # its workers go with it (os.killpg below)
    )
    driver = None
    try:
        url = runs_url(store.uri, exp_id, SWEEP).replace("127.0.0.1:5000", f"127.0.0.1:{port}")
        deadline = clock.monotonic() + 60
        while clock.monotonic() < deadline:  # the server takes a few seconds to listen
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            clock.sleep(0.5)
        driver = chrome(tmp_path, "--window-size=1600,1000")
        driver.get(url)
        text = ""
        while clock.monotonic() < deadline:
            text = driver.find_element(By.TAG_NAME, "body").text
            if "trial-t0011" in text and "resurgence" in text:
                break
            clock.sleep(0.5)
        driver.save_screenshot(str(tmp_path / "mlflow.png"))
        assert "trial-t0000" in text and "trial-t0011" in text, text[:2000]  # the sweep's trial runs
        assert "trial-old00000" not in text and SWEEP + "\n" not in text  # not the old sweep's, not the parent
        headers = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "[role=columnheader]")]
        assert any("resurgence" in h for h in headers), headers
        assert "No traces" not in text and "0 traces" not in text
    finally:
        if driver is not None:
            driver.quit()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(tmp_path / "chromium", ignore_errors=True)


def test_importance_of_a_flat_sweep_is_a_note_not_a_crash():
    from orchestrator.report import importances

    rows = [
        {"status": "FINISHED", "final.resurgence": 0.0, "finetune.config.lr": lr, "finetune.config.trainable": t}
        for lr, t in ((1e-4, "full"), (1e-3, "xattn"), (3e-4, "lora"))
    ]
    note = importances(rows, ["finetune.config.lr", "finetune.config.trainable"])
    assert isinstance(note, str) and "same final resurgence" in note


def test_best_trials_show_each_erased_concepts_resurgence(tmp_path: Path) -> None:
    """A mass-erasure sweep: the best-trials table puts each erased concept's final resurgence beside the mean,
    and the Parquet keeps them as columns."""
    s = Store(tmp_path / "mlflow")
    exp = s.experiment("mass")
    sweep = "mass-20261206-100000"
    parent = s.run(exp, sweep, {"stage": "sweep", "sweep": sweep})
    finals = {"t0": (0.1, 0.3), "t1": (0.5, 0.0)}
    for trial_id, (circle, star) in finals.items():
        tags = {"stage": "trial", "sweep": sweep, "trial_id": trial_id, "searched": json.dumps([])}
        run = s.run(exp, f"trial-{trial_id}", tags, parent)
        metrics = [("resurgence", 0.0, 0), ("resurgence.circle", 0.0, 0), ("resurgence.star", 0.0, 0)]
        metrics += [("resurgence", (circle + star) / 2, 10), ("resurgence.circle", circle, 10)]
        metrics += [("resurgence.star", star, 10), ("presence.circle", 0.5 + circle, 10), ("presence.star", 0.8, 10)]
        metrics += [("presence", 0.5, 10), ("presence_lo", 0.3, 10), ("presence_hi", 0.7, 10)]
        metrics += [("resurgence_lo", -0.1, 10), ("resurgence_hi", 0.6, 10), ("presence_images", 24, 0)]
        s.log(run, EVALUATOR, metrics)
        s.client.set_terminated(run, "FINISHED")
    index = write_report(s.uri, "mass", tmp_path / "report", log_to_parent=False)
    page = index.read_text()
    table = page[page.index("Best trials by final") :]
    table = table[: table.index("</table>")]
    assert "final resurgence.circle [95% CI]" in table and "final resurgence.star [95% CI]" in table
    rows = table.split("<tr>")[2:]  # header first
    assert rows[0].index("t1") < rows[0].index("0.5") and "0.3" in rows[1]  # t1 (mean 0.25) ranks first
    # every figure with its 95% interval and n: the mean's as logged, each concept's over its 12 of the 24 images
    assert "+0.25 [-0.10, +0.60]" in rows[0] and "0.50 [0.30, 0.70]" in rows[0] and ">24<" in rows[0]
    for row, (circle, _) in zip(rows, [finals["t1"], finals["t0"]], strict=True):
        low, high = newcombe(0.5 + circle, 12, 0.5, 12)
        assert f">{with_interval(circle, low, high, signed=True)}<" in row
    columns = pq.read_table(tmp_path / "report" / "trials.parquet").column_names
    assert {"resurgence.circle", "resurgence.star"} <= set(columns)
