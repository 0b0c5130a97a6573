"""The attacker against random search on the toy world, same budget, same run; and how well the cheap
proxy ranks trials.

    python benchmarks/attacker_vs_random.py                         # 10 trials each, seeds 0 1 2 (~45 min on 2 cores)
    python benchmarks/attacker_vs_random.py --trials 4 --seeds 0    # a quick look

Both sweeps run `search_spaces/toy_resurgence.yaml` (ESD-x erases "cross"; fine-tuning on cross-free
images; lr, trainable subset and steps searched) through `orchestrator.sweep.run_sweep`:
- **attacker**: Optuna TPE with ASHA stopping fine-tunes early on the cheap `resurgence_proxy`;
- **random**: Optuna's random sampler, no early stopping, the same number of trials.
Both evaluate in full at every rung and report the proxy, with common random numbers (the same noise and
seeds for every trial), so the proxy's rank correlation with the final presence is measured on the
random sweep's trials (which all run to the end).

Each search seed (`search.seed`: the sampler's seed) gives one pair of sweeps. Per pair: the best resurgence
each found (the highest peak of any trial's curve) with its 95% interval (Newcombe's hybrid score over the n
images of the cross at that peak and right after erasure) and the compute each spent (fine-tuning steps summed
over its trials, as ASHA stops some early; and the trials' seconds, without the one erasure all sweeps share).
Every trial is evaluated on `--images-per-prompt` images of each of the cross's 6 prompts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from methods.evaluation.intervals import newcombe  # noqa: E402
from orchestrator.formatting import finite, with_interval  # noqa: E402


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


def sweep_data(
    trials: int, algorithm: str, asha: bool, seed: int, images: int, startup: int, grace: int
) -> dict[str, Any]:
    data = yaml.safe_load((REPO / "search_spaces" / "toy_resurgence.yaml").read_text())
    data["name"] = f"attacker-vs-random-{algorithm}"
    data["evaluate"]["proxy"] = {"images_per_prompt": 1, "repeats": 4}
    data["evaluate"]["config"]["images_per_prompt"] = images
    data["search"]["num_samples"] = trials
    data["search"]["algorithm"] = algorithm
    data["search"]["seed"] = seed
    if algorithm == "tpe":  # TPE's random start; Optuna's default (10) would leave a 10-trial budget all random
        data["search"]["startup_trials"] = startup
    if asha:
        data["search"]["scheduler"] = {"name": "asha", "metric": "resurgence_proxy", "grace_period": grace}
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


def best_found(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The sweep's best trial (highest peak resurgence) with its interval, and the compute the sweep spent."""
    done = [r for r in rows if finite(r.get("peak_resurgence"))]
    best = max(done, key=lambda r: r["peak_resurgence"])
    n, erased, peak = best.get("presence_images", float("nan")), best["presence_erased"], best["peak_resurgence"]
    low, high = newcombe(erased + peak, n, erased, n) if finite(n) else (float("nan"), float("nan"))
    return {
        "best": peak,
        "low": low,
        "high": high,
        "n": n,
        "trials": len(done),
        "steps": sum(r["ft_step"] for r in done if finite(r.get("ft_step"))),
        # trial wall seconds without the one erasure every sweep shares through the cache (paid by its first trial)
        "seconds": sum(
            r["trial_seconds"] - (r["erase_seconds"] if r.get("erase_cache") == "miss" else 0.0)
            for r in done
            if finite(r.get("trial_seconds"))
        ),
        "median_peak": statistics.median(r["peak_resurgence"] for r in done),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per sweep")
    parser.add_argument("--startup", type=int, default=3, help="TPE's random trials before its model proposes")
    parser.add_argument("--grace", type=int, default=25, help="ASHA's first rung (fine-tuning steps)")
    parser.add_argument(
        "--attacker-only", action="store_true", help="skip the random sweeps (their results do not depend on ASHA)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search seeds (one pair each)")
    parser.add_argument("--images-per-prompt", type=int, default=3, help="evaluation images per prompt (6 prompts)")
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
    sweeps = (("attacker", "tpe", True), ("random", "random", False))[: 1 if args.attacker_only else 2]
    found: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in sweeps}
    random_curves: list[dict[str, dict[int, float]]] = []
    for seed in args.seeds:
        for label, algorithm, asha in sweeps:
            data = sweep_data(args.trials, algorithm, asha, seed, args.images_per_prompt, args.startup, args.grace)
            data["storage_path"], data["cache_dir"] = str(tmp / "ray_results"), str(tmp / "cache")  # one erase cache
            experiment = parse_experiment(data)
            start = time.perf_counter()
            outcome = run_sweep(experiment, uri, "toy_resurgence.yaml", write_html=False, one_node=True)
            wall = time.perf_counter() - start
            found[label].append({"seed": seed, "wall": wall, **best_found(outcome.rows)})
            if label == "random":
                random_curves += curves(uri, outcome.run_name, experiment.spec.name)
    ray.shutdown()

    print(f"\n=== attacker (TPE + ASHA on the proxy) vs random search: toy world, {args.trials} trials each ===")
    print("| search | seed | best resurgence [95% CI] n | median trial peak | fine-tuning steps | trial s | wall s |")
    print("|---|---|---|---|---|---|---|")
    for label, runs in found.items():
        for f in runs:
            print(
                f"| {label} | {f['seed']} | {with_interval(f['best'], f['low'], f['high'], f['n'], signed=True)} | "
                f"{f['median_peak']:+.2f} | {f['steps']:.0f} | {f['seconds']:.0f} | {f['wall']:.0f} |"
            )
    for label, runs in found.items():
        bests = [f["best"] for f in runs]
        print(
            f"{label}: best resurgence mean {statistics.fmean(bests):+.3f} over {len(bests)} seeds (range "
            f"{min(bests):+.3f} to {max(bests):+.3f}); fine-tuning steps "
            f"{statistics.fmean(f['steps'] for f in runs):.0f} per sweep on average"
        )
    if args.attacker_only:
        return
    wins = sum(a["best"] > r["best"] for a, r in zip(found["attacker"], found["random"], strict=True))
    ties = sum(a["best"] == r["best"] for a, r in zip(found["attacker"], found["random"], strict=True))
    print(f"attacker ahead on {wins} of {len(args.seeds)} seeds, tied on {ties}")

    # the proxy: rank correlation with the final presence, at every rung, over the random sweeps' trials
    final_presence = [c["presence"][max(c["presence"])] for c in random_curves]
    steps = sorted({s for c in random_curves for s in c["resurgence_proxy"]} - {0})
    print("proxy rank correlation with the final presence (Spearman, random sweeps' trials):")
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
