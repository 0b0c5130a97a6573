"""A trial as plain Python: its reports, and the per-worker erasure memo."""

import pytest
import yaml

from orchestrator.resolved import resolve
from orchestrator.trial import _WARM, execute_trial
from tests.conftest import REPO

SMOKE = yaml.safe_load((REPO / "search_spaces" / "smoke.yaml").read_text())
FAST = {
    "finetune.config.steps": 4,
    "finetune.eval_every": 2,
    "erase.config.iterations": 2,
    "evaluate.config.images_per_prompt": 1,
    "finetune.dataset.config.images_per_prompt": 1,
}


@pytest.fixture(autouse=True)
def fresh_worker():
    """Each test starts as a new worker: nothing warm from an earlier test in this process."""
    _WARM.clear()


def _run(tmp_path, **overrides):
    data = {**SMOKE, "cache_dir": str(tmp_path / "cache")}
    reports = []
    last = execute_trial(resolve(data, {**FAST, **overrides}), reports.append, tmp_path / "trial")
    return reports, last


def test_reports_and_erasure_memo(tmp_path):
    reports, last = _run(tmp_path)
    assert [r["ft_step"] for r in reports] == [0, 2, 4]
    assert reports[0]["resurgence"] == 0.0
    for r in reports:
        assert abs(r["resurgence"] - (r["presence"] - r["presence_erased"])) < 1e-12
        assert 0.0 <= r["retention"] <= 1.0
        # the 95% Wilson interval of presence over its n images, the score formula written out here
        p, n, z = r["presence"], r["presence_images"], 1.959964
        centre, half = (
            (p + z * z / (2 * n)) / (1 + z * z / n),
            z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5,
        )
        assert r["presence_lo"] == pytest.approx(max(0.0, centre - half), abs=1e-6)
        assert r["presence_hi"] == pytest.approx(min(1.0, centre + half), abs=1e-6)
        assert r["resurgence_lo"] <= r["resurgence"] <= r["resurgence_hi"]
        assert r["resurgence_hi"] - r["resurgence_lo"] > r["presence_hi"] - r["presence_lo"]  # two proportions' noise
    assert last is reports[-1] and (tmp_path / "trial" / "samples.png").is_file()
    assert reports[0]["erase_cached"] == 0.0  # the first trial of this worker erases
    # the same erasure again: this worker reuses it; the fine-tuning differs, the erased start does not
    again, _ = _run(tmp_path, **{"finetune.config.lr": 1e-3})
    assert again[0]["erase_cached"] == 1.0 and again[0]["presence_erased"] == reports[0]["presence_erased"]
    assert again[0]["erase_seconds"] == reports[0]["erase_seconds"]
    # another erasure config is erased anew
    other, _ = _run(tmp_path, **{"erase.config.iterations": 3})
    assert other[0]["erase_cached"] == 0.0


def test_covariates(tmp_path):
    reports, _ = _run(tmp_path)
    assert reports[0]["erase_distance"] > 0 and reports[0]["ft_distance"] == 0.0
    assert reports[-1]["ft_distance"] > 0  # fine-tuning moved the weights
    assert -1.0 <= reports[0]["data_closeness"] <= 1.0


def test_control_trial_and_multi_round_relearning_attack(tmp_path):
    """Method `none` leaves the base model (no distance, presence_erased = presence_base); two rounds,
    benign data then images of the concept itself, keep ft_step growing across rounds."""
    reports, _ = _run(
        tmp_path,
        **{
            "erase": {"method": "none"},
            "finetune.dataset": None,
            "finetune.datasets": {
                "benign": {
                    "name": "generated",
                    "config": {"prompts": ["a square"], "images_per_prompt": 1, "steps": 2},
                },
                "relearn": {"name": "concept", "config": {"images_per_prompt": 1, "steps": 2}},
            },
            "finetune.data": "benign+relearn",
            "finetune.rounds": 2,
        },
    )
    assert [r["ft_step"] for r in reports] == [0, 2, 4, 6, 8]
    assert reports[0]["erase_distance"] == 0.0 and reports[0]["presence_erased"] == reports[0]["presence_base"]


def test_mass_erasure_reports_the_mean_and_each_erased_concept(tmp_path):
    """Several concepts erased at once (MACE): presence and resurgence are their mean, each one's own is
    reported too, retention is over the concepts never erased; erase_count takes the first N, and the erase
    cache keys on the whole erased set."""
    from orchestrator.trial import concepts

    pool = [
        {"name": "circle", "prompts": ["a circle", "a drawing of a circle"]},
        {"name": "star", "prompts": ["a star"]},
        {"name": "ring", "prompts": ["a ring", "a gold ring"]},
    ]
    mace = {"erase": {"method": "mace", "config": {"steps": 2, "images": 2, "image_steps": 2}}}
    data = {**SMOKE, **mace, "concept": pool, "cache_dir": str(tmp_path / "cache")}
    fast = {k: v for k, v in FAST.items() if not k.startswith("erase.")}
    trial = resolve(data, {**fast, "erase_count": 2})
    assert [c.name for c in trial.spec.targets] == ["circle", "star"]
    assert [c["name"] for c in trial.erase_content()["targets"]] == ["circle", "star"]
    assert [c.name for c in concepts(trial)] == ["circle", "star", "square", "triangle"]
    reports = []
    execute_trial(trial, reports.append, tmp_path / "trial")
    for r in reports:
        mean = (r["presence.circle"] + r["presence.star"]) / 2
        assert abs(r["presence"] - mean) < 1e-12 and "presence.ring" not in r
        assert abs(r["resurgence"] - (r["presence"] - r["presence_erased"])) < 1e-12
        gone = r["resurgence.circle"] + r["resurgence.star"]
        assert abs(gone / 2 - r["resurgence"]) < 1e-12
    assert reports[0]["presence_images"] == 3  # circle's two prompts and star's one, one image each
    one = resolve(data, {**fast, "erase_count": 1})
    assert one.erase_content() != trial.erase_content() and len(one.spec.targets) == 1
