"""The attacker against random search on the toy world, same budget, same run; and how well the cheap
proxy ranks trials.

    python benchmarks/attacker_vs_random.py                 # 16 trials each (about 15 minutes on 2 cores)
    python benchmarks/attacker_vs_random.py --trials 6      # a quick look

Both sweeps run `search_spaces/toy_resurgence.yaml` (ESD-x erases "cross"; fine-tuning on cross-free
images; lr, trainable subset and steps searched) through `orchestrator.sweep.run_sweep`:
- **attacker**: Optuna TPE with ASHA stopping fine-tunes early on the cheap `resurgence_proxy`;
- **random**: Optuna's random sampler, no early stopping, the same number of trials.
Both evaluate in full at every rung and report the proxy, with common random numbers (the same noise and
seeds for every trial), so the proxy's rank correlation with the final presence is measured on the
random sweep's trials (which all run to the end).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def ranks(values: list[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float:
    rx, ry = ranks(x), ranks(y)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if sx and sy else float("nan")


def sweep_data(trials: int, algorithm: str, asha: bool) -> dict[str, Any]:
    data = yaml.safe_load((REPO / "search_spaces" / "toy_resurgence.yaml").read_text())
    data["name"] = f"attacker-vs-random-{algorithm}"
    data["evaluate"]["proxy"] = {"images_per_prompt": 1, "repeats": 4}
    data["search"]["num_samples"] = trials
    data["search"]["algorithm"] = algorithm
    if asha:
        data["search"]["scheduler"] = {"name": "asha", "metric": "resurgence_proxy", "grace_period": 25}
    else:
        data["search"].pop("scheduler", None)
    data.pop("smoke", None)
    return data


def curves(uri: str, run_name: str, experiment: str) -> list[dict[str, dict[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([exp], f"tags.sweep = '{run_name}' and tags.stage = 'trial'", max_results=1000)
    out = []
    for run in runs:
        out.append(
            {
                key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                for key in ("resurgence", "presence", "resurgence_proxy")
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    args = parser.parse_args()
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = Path(tempfile.mkdtemp(prefix="attacker-vs-random-"))
    os.chdir(tmp)

    import ray

    from orchestrator.cli import start_local_ray
    from orchestrator.spec import parse_experiment
    from orchestrator.store import default_tracking_uri
    from orchestrator.sweep import run_sweep

    start_local_ray(num_cpus=2, configure_logging=False)  # the Ray `resurgence run` starts
    uri = default_tracking_uri()
    results = {}
    for label, algorithm, asha in (("attacker (TPE + ASHA on the proxy)", "tpe", True), ("random", "random", False)):
        data = sweep_data(args.trials, algorithm, asha)
        data["storage_path"], data["cache_dir"] = str(tmp / "ray_results"), str(tmp / "cache")  # one erase cache
        experiment = parse_experiment(data)
        start = time.perf_counter()
        outcome = run_sweep(experiment, uri, "toy_resurgence.yaml", write_html=False, one_node=True)
        results[label] = (outcome, time.perf_counter() - start, curves(uri, outcome.run_name, experiment.spec.name))
    ray.shutdown()

    print("\n=== attacker vs random search (toy world, same budget) ===")
    for label, (_, wall, trial_curves) in results.items():
        peaks = [max(c["resurgence"].values()) for c in trial_curves if c["resurgence"]]
        finals = [c["resurgence"][max(c["resurgence"])] for c in trial_curves if c["resurgence"]]
        print(
            f"{label:<36} {len(peaks)} trials, {wall:.0f} s: best resurgence {max(peaks):.3f} "
            f"(final {max(finals):.3f}), median trial peak {statistics.median(peaks):.3f}"
        )
    attacker = max(max(c["resurgence"].values()) for c in results["attacker (TPE + ASHA on the proxy)"][2])
    random_curves = results["random"][2]
    random_median = statistics.median(max(c["resurgence"].values()) for c in random_curves)
    print(
        f"attacker's best {attacker:.3f} vs random search's median trial {random_median:.3f}: "
        f"{'attacker ahead' if attacker > random_median else 'attacker NOT ahead'}"
    )

    # the proxy: rank correlation with the final presence, at every rung, over the random sweep's trials
    final_presence = [c["presence"][max(c["presence"])] for c in random_curves]
    steps = sorted({s for c in random_curves for s in c["resurgence_proxy"]} - {0})
    print("proxy rank correlation with the final presence (Spearman, random sweep's trials):")
    for step in steps:
        pairs = [
            (c["resurgence_proxy"][step], p)
            for c, p in zip(random_curves, final_presence, strict=True)
            if step in c["resurgence_proxy"]
        ]
        full = [
            (c["presence"][step], p)
            for c, p in zip(random_curves, final_presence, strict=True)
            if step in c["presence"]
        ]
        print(
            f"  step {step:>3}: proxy rho {spearman(*map(list, zip(*pairs, strict=True))):+.2f} over {len(pairs)} "
            f"trials; the full presence at that step: rho {spearman(*map(list, zip(*full, strict=True))):+.2f}"
        )


if __name__ == "__main__":
    main()
