"""The search's structure: grid cells with one study each, waves continuing persistent studies, the
spec rules for grids, the proxy and the defender, and the proxy-driven trial."""

import math

import pytest
import yaml

from orchestrator.ledger import TrialLedger
from orchestrator.resolved import RESOLVED_KEY, resolve
from orchestrator.search import Cell, CellSearch, TrialRows, grid_cells, sampled_space, study_storage, wave_orders
from orchestrator.spec import Dimension, SpecError, parse_experiment, parse_spec
from orchestrator.trial import execute_trial
from tests.conftest import REPO

SMOKE = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())


def test_grid_cells_and_waves():
    space = {
        "erase.method": Dimension(grid=["esd", "uce"]),
        "concept.name": Dimension(grid=["a", "b", "c"]),
        "finetune.config.lr": Dimension(loguniform=(1e-5, 1e-3)),
    }
    cells = grid_cells(space)
    assert len(cells) == 6 and {"erase.method": "uce", "concept.name": "b"} in cells
    assert list(sampled_space(space)) == ["finetune.config.lr"]
    assert grid_cells({"finetune.config.lr": Dimension(uniform=(0, 1))}) == [{}]
    waves = wave_orders(3, 4, 5)  # 3 cells x 4 trials, 5 per wave
    assert [len(w) for w in waves] == [5, 5, 2]
    flat = [c for w in waves for c in w]
    assert all(flat.count(c) == 4 for c in range(3)) and flat[:3] == [0, 1, 2]  # round-robin


SPACE = {
    "finetune.config.lr": Dimension(loguniform=(1e-5, 1e-3)),
    "finetune.config.trainable": Dimension(choice=["full", "xattn"]),
}

SPACE_TRAINABLE = ("full", "xattn")


def searcher(tmp_path, cells, slots, startup=None):
    """A CellSearch over `cells` filling `slots` [(name, cell)], its ledger in tmp_path (a driver's view), for
    the smoke experiment with SPACE searched and the erasure method a grid (ESD or UCE, default configs)."""
    data = _spec(**{"erase/config": {}, "search/scheduler": None, "search/startup_trials": startup})
    data["search"]["space"] = {
        "erase.method": {"grid": ["esd", "uce"]},
        **{path: dim.model_dump(exclude_none=True) for path, dim in SPACE.items()},
    }
    ledger = TrialLedger(tmp_path)
    return CellSearch(
        parse_experiment(data),
        cells,
        slots,
        SPACE,
        metric="resurgence",
        mode="max",
        algorithm="tpe",
        storage=study_storage(tmp_path / "optuna.journal"),
        ledger=ledger,
        rows=TrialRows(ledger, str(tmp_path)),
    )


def test_cell_search_hands_out_cells_and_continues_its_studies_across_waves(tmp_path):
    import optuna
    from ray.tune.search import Searcher

    cells = [Cell({"erase.method": "esd"}, "s-cell0", 0), Cell({"erase.method": "uce"}, "s-cell1", 1)]
    first = searcher(tmp_path, cells, [(f"w0-t{k}", cell) for k, cell in enumerate([0, 1, 0, 1])])
    configs = [first.suggest(f"t{i}") for i in range(4)]
    assert first.suggest("t4") == Searcher.FINISHED
    assert [c["erase.method"] for c in configs] == ["esd", "uce", "esd", "uce"]
    assert all(
        1e-5 <= c["finetune.config.lr"] <= 1e-3 and c["finetune.config.trainable"] in SPACE_TRAINABLE for c in configs
    )
    for c in configs:  # each trial's resolved settings, built once here and carried in its config
        trial = c[RESOLVED_KEY]
        assert trial.slot == c["_trial"] and trial.spec.erase.method == c["erase.method"]
        assert trial.components.finetune.lr == c["finetune.config.lr"]
        assert trial.params["finetune"]["config"]["trainable"] == c["finetune.config.trainable"]
        assert type(trial.components.erase).__name__ == {"esd": "ESDConfig", "uce": "UCEConfig"}[c["erase.method"]]
    first.on_trial_result("t0", {"ft_step": 5, "resurgence_proxy": 0.3, "training_iteration": 1})  # no metric
    for i in range(4):
        first.on_trial_complete(f"t{i}", {"resurgence": 0.1 * i, "training_iteration": 2})
    # the next wave: new searcher objects, the same journal file
    second = searcher(tmp_path, cells, [("w1-t0", 0), ("w1-t1", 1)])
    second.suggest("u0")
    second.suggest("u1")
    storage = study_storage(tmp_path / "optuna.journal")
    for name in ("s-cell0", "s-cell1"):
        study = optuna.load_study(study_name=name, storage=storage)
        states = [t.state for t in study.trials]
        assert states.count(optuna.trial.TrialState.COMPLETE) == 2 and len(states) == 3
    best = optuna.load_study(study_name="s-cell1", storage=storage).best_value
    assert math.isclose(best, 0.3)  # cell 1 got trials t1 (0.1) and t3 (0.3): results reach their own cell


def test_tpe_startup_trials_reach_every_cells_sampler(tmp_path):
    """search.startup_trials: TPE's random start, which Optuna sets to 10 (a 10-trial budget all random)."""
    cells = [Cell({"erase.method": "esd"}, "a-cell0", 0), Cell({"erase.method": "uce"}, "a-cell1", 1)]
    default = searcher(tmp_path / "d", cells, [("t0", 0), ("t1", 1)])
    short = searcher(tmp_path / "s", cells, [("t0", 0), ("t1", 1)], startup=2)
    assert [s.sampler._n_startup_trials for s in default.studies.values()] == [10, 10]
    assert [s.sampler._n_startup_trials for s in short.studies.values()] == [2, 2]


def _spec(**changes):
    data = yaml.safe_load(yaml.safe_dump(SMOKE))
    for path, value in changes.items():
        node = data
        *head, last = path.split("/")
        for key in head:
            node = node.setdefault(key, {})
        node[last] = value
    return data


def test_spec_rules():
    # methods as a grid dimension: each value is a whole `erase` section (every method has its own config)
    methods = [{"method": "esd", "config": {"iterations": 2}}, {"method": "uce"}, {"method": "none"}]
    spec = parse_spec(_spec(**{"search/space/erase": {"grid": methods}}))
    assert len(grid_cells(spec.search.space)) == 3
    with pytest.raises(SpecError, match=r"^search\.space\.erase\.method: value 'none' is invalid: erase\.config\.eta"):
        parse_spec(_spec(**{"search/space/erase.method": {"grid": ["esd", "none"]}}))  # esd's config on none
    with pytest.raises(SpecError, match=r"^search\.space\.erase\.method: value 'nope' is invalid: erase\.method"):
        parse_spec(_spec(**{"search/space/erase.method": {"grid": ["esd", "nope"]}}))
    with pytest.raises(SpecError, match="resurgence_proxy needs evaluate.proxy"):
        parse_spec(_spec(**{"search/scheduler/metric": "resurgence_proxy"}))
    with pytest.raises(SpecError, match="evaluate.full: with `end`"):
        parse_spec(_spec(**{"evaluate/full": "end"}))
    with pytest.raises(SpecError, match=r"^evaluate\.proxy\.repeats: Input should be greater than or equal to 1"):
        parse_spec(_spec(**{"evaluate/proxy": {"repeats": 0}}))
    with pytest.raises(SpecError, match=r"^defender\.space\.finetune\.config\.batch_size: the defender chooses"):
        parse_spec(_spec(defender={"space": {"finetune.config.batch_size": {"choice": [1, 2]}}}))
    with pytest.raises(SpecError, match=r"^defender\.space\.finetune\.config\.lr: searched by the attacker"):
        parse_spec(_spec(defender={"space": {"finetune.config.lr": {"uniform": [0.1, 0.2]}}}))
    with pytest.raises(SpecError, match=r"^defender\.space\.erase\.config\.bogus: value 0\.1 is invalid"):
        parse_spec(_spec(defender={"space": {"erase.config.bogus": {"uniform": [0.1, 0.2]}}}))
    with pytest.raises(SpecError, match=r"^search\.space\.defender\.candidates: only trial settings"):
        parse_spec(_spec(**{"search/space/defender.candidates": {"choice": [1]}}))
    for name in ("toy_defense.yaml", "toy_resurgence.yaml", "toy_attacks.yaml"):
        parse_spec(yaml.safe_load((REPO / "search_spaces" / name).read_text()))


def test_proxy_at_every_rung_full_evaluation_at_the_end(tmp_path):
    """With evaluate.full = end, rungs carry only the proxy (0 right after erasure, by definition) and the
    full presence evaluation runs at step 0 and at the end; the probe is the same for every trial (common
    random numbers), so two trials that fine-tune identically report identical proxies."""
    data = {**SMOKE, "cache_dir": str(tmp_path / "cache")}
    overrides = {
        "finetune.config.steps": 4,
        "finetune.eval_every": 1,
        "erase.config.iterations": 2,
        "evaluate.config.images_per_prompt": 1,
        "finetune.dataset.config.images_per_prompt": 1,
        "evaluate.proxy": {"images_per_prompt": 1, "repeats": 2},
        "evaluate.full": "end",
        "search.scheduler.metric": "resurgence_proxy",
    }
    reports: list[dict] = []
    execute_trial(resolve(data, overrides), reports.append, tmp_path / "t")
    assert [r["ft_step"] for r in reports] == [0, 1, 2, 3, 4]
    assert [("resurgence" in r) for r in reports] == [True, False, False, False, True]
    assert reports[0]["resurgence_proxy"] == 0.0
    assert all(math.isfinite(r["resurgence_proxy"]) for r in reports)
    assert len({r["resurgence_proxy"] for r in reports[1:]}) > 1  # it moves while fine-tuning
    again: list[dict] = []
    execute_trial(resolve(data, overrides), again.append, tmp_path / "t2")
    assert [r["resurgence_proxy"] for r in again] == [r["resurgence_proxy"] for r in reports]


def test_tune_loop_waits_up_to_a_second_for_events_and_keeps_the_users_state_period(tmp_path, monkeypatch):
    """The driver's Tune loop (`calm_tune_loop`): its waits for an event last up to 1 s instead of 0.1 s, so a
    trial of 4 s costs about ten rounds instead of about sixty; the trial still reports and ends as usual; the
    experiment state is written every 60 s unless TUNE_GLOBAL_CHECKPOINT_S is set."""
    import os
    import time

    import ray
    from ray import tune
    from ray.air.execution._internal.actor_manager import RayActorManager

    from orchestrator import search
    from orchestrator.cli import start_local_ray

    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "5")
    search.calm_tune_loop()
    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "5"  # the user's own value
    monkeypatch.delenv("TUNE_GLOBAL_CHECKPOINT_S")

    waits: list[float | None] = []
    wait_for_event = RayActorManager.next

    def counted(self, timeout=None):
        waits.append(timeout)
        return wait_for_event(self, timeout=timeout)

    monkeypatch.setattr(RayActorManager, "next", counted)
    search.calm_tune_loop()
    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == search.TUNE_STATE_EVERY_S

    def trainable(config):
        time.sleep(4)
        tune.report({"x": config["x"]})

    start_local_ray(num_cpus=1, configure_logging=False)
    try:
        started = time.monotonic()
        grid = tune.Tuner(
            trainable,
            param_space={"x": 7},
            run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0),
        ).fit()
        wall = time.monotonic() - started
    finally:
        ray.shutdown()
    assert grid.num_errors == 0 and grid[0].metrics["x"] == 7
    assert waits and all(w is None or w >= search.TUNE_IDLE_WAIT_S for w in waits), waits
    assert len(waits) <= 2 * wall + 6, (len(waits), wall)  # Tune as shipped: about 10 a second
