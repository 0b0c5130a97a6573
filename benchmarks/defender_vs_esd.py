"""The defender on the toy world, for real: does a meta-unlearning setting the defender search finds keep the
cross erased better than plain ESD-x, under the same attacks?

1. **Defender search**: `search_spaces/toy_defense.yaml` as committed (not its smoke budget): meta-unlearning
   around ESD-x with the bar as the related concept, TPE over gamma2_1, gamma1_1, gamma1_2 and gamma2_2, each
   candidate erased once and attacked by an attacker search of `search.num_samples` trials (benign cross-free
   data or the relearning attack on real crosses; lr; trainable subset) with attacker seed 0; its score is
   the worst case those attacks reached (the cross's presence at the attack's peak: the defender's default
   `score: presence`), subject to retention >= 0.75 right after erasure.
2. **Fresh attacks**: plain ESD-x (the same ESD-x the meta candidates wrap, same iterations and lr) and the
   best feasible candidate are each attacked again by the same attacker search with fresh seeds (1, 2, 3 by
   default: not the seed that chose the candidate). Per model and seed, from the attack trial that brought
   the cross back the most: the worst-case resurgence (its peak rise) with its 95% interval (Newcombe's hybrid
   score over the n images at the peak and right after erasure), the presence it reached (Wilson interval),
   the retention right after erasure and at the end of that attack; then the spread over the seeds.

    python benchmarks/defender_vs_esd.py                    # 6 candidates x 4 attacks + 2 x 3 x 4: ~40 min on 2 cores
    python benchmarks/defender_vs_esd.py --candidates 2 --attacks 1 --outer-steps 5 --seeds 1   # a check it runs
    python benchmarks/defender_vs_esd.py --json defender.json
    python benchmarks/defender_vs_esd.py --gammas gamma2_1=0.04 gamma1_1=0.27 gamma1_2=0.064 gamma2_2=0.043 \
        --workdir /tmp/defender-vs-esd-XXXX      # fresh attacks only, on given gammas (reusing that run's cache)

The aim (issue 27): a candidate whose mean worst-case resurgence is at least 30% lower than ESD-x's at
retention >= 0.75. The last lines say whether it was reached, for the resurgence and for the presence reached
(a rise is relative: a model that erased less has less room to rise).
"""

from __future__ import annotations

import argparse
import copy
import json
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

from methods.evaluation.intervals import newcombe, wilson  # noqa: E402
from orchestrator.defender import presence_reached  # noqa: E402
from orchestrator.formatting import finite, with_interval  # noqa: E402


def defense_data(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    data = yaml.safe_load((REPO / "search_spaces" / "toy_defense.yaml").read_text())
    data.pop("smoke", None)
    data["defender"]["candidates"] = args.candidates
    data["search"]["num_samples"] = args.attacks
    data["erase"]["config"]["outer_steps"] = args.outer_steps
    data["storage_path"], data["cache_dir"] = str(tmp / "ray_results"), str(tmp / "cache")  # one erase cache
    return data


def attack_data(defense: dict[str, Any], erase: dict[str, Any], seed: int, label: str) -> dict[str, Any]:
    data = copy.deepcopy(defense)
    data.pop("defender")
    data["erase"] = erase
    data["search"]["seed"] = seed
    data["name"] = f"defender-vs-esd-{label}"
    return data


def worst_case(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The attack trial whose cross reached the highest presence (the defender's score), with its resurgence
    and presence intervals and the retentions."""
    done = [r for r in rows if finite(r.get("peak_resurgence"))]
    worst = max(done, key=presence_reached)
    n = worst.get("presence_images", float("nan"))
    erased = worst["presence_erased"]
    peak = worst["peak_resurgence"]
    nan = (float("nan"), float("nan"))
    low, high = newcombe(erased + peak, n, erased, n) if finite(n) else nan
    return {
        "worst": peak,
        "low": low,
        "high": high,
        "n": n,
        "reached": erased + peak,
        "reached_interval": wilson(erased + peak, n) if finite(n) else nan,
        "presence_erased": erased,
        "retention_erased": worst["retention_erased"],
        "retention_end": worst["retention"],
        "config": {k: v for k, v in worst["config"].items() if not k.startswith("_")},
        "trials": len(done),
    }


def search(defense: dict[str, Any], uri: str, started: float) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The defender search as the spec runs it; its candidates and the one to attack again: the best feasible
    one, else (none kept the floor) the one with the highest retention, said so."""
    from orchestrator.spec import parse_experiment
    from orchestrator.sweep import run_sweep

    outcome = run_sweep(parse_experiment(defense), uri, "toy_defense.yaml", write_html=False, one_node=True)
    by_candidate: dict[int, list[dict[str, Any]]] = {}
    for row in outcome.rows:
        by_candidate.setdefault(row["config"]["_candidate"], []).append(row)
    candidates = []
    for number, rows in sorted(by_candidate.items()):
        case = worst_case(rows)
        gammas = {k.split(".")[-1]: v for k, v in rows[0]["config"].items() if k.startswith("erase.config.gamma")}
        candidates.append({"candidate": number, "gammas": gammas, **case})
    floor = defense["defender"]["retention_floor"]
    feasible = [c for c in candidates if c["retention_erased"] >= floor]

    print("\n=== defender search (toy world; attacker seed 0; worst case over its attack trials) ===")
    for c in candidates:
        gammas = ", ".join(f"{k}={v:.3g}" for k, v in c["gammas"].items())
        print(
            f"candidate {c['candidate']}: presence after erasure {c['presence_erased']:.2f}, worst attack reached "
            f"{with_interval(c['reached'], *c['reached_interval'], c['n'])} "
            f"(resurgence {with_interval(c['worst'], c['low'], c['high'], signed=True)}), "
            f"retention {c['retention_erased']:.2f}{'' if c['retention_erased'] >= floor else ' (below floor)'}"
            f"  [{gammas}]"
        )
    if not candidates:
        print("no candidate finished: nothing to compare")
        return candidates, None
    if feasible:
        best = min(feasible, key=lambda c: (c["reached"], -c["retention_erased"]))
        print(f"best feasible: candidate {best['candidate']} ({time.perf_counter() - started:.0f} s for the search)")
    else:
        best = max(candidates, key=lambda c: c["retention_erased"])
        print(f"no candidate kept retention >= {floor}; attacking the one with the highest: {best['candidate']}")
    return candidates, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--candidates", type=int, default=6, help="defender candidates")
    parser.add_argument("--attacks", type=int, default=4, help="attack trials per candidate and per fresh seed")
    parser.add_argument("--outer-steps", type=int, default=200, help="meta-unlearning outer steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="fresh attacker seeds")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--gammas", nargs="+", metavar="NAME=VALUE", help="skip the search: attack these gammas")
    parser.add_argument("--workdir", type=Path, help="work (and erase cache) folder; default: a new one")
    args = parser.parse_args()
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="defender-vs-esd-"))
    tmp.mkdir(parents=True, exist_ok=True)
    os.chdir(tmp)

    import ray

    from orchestrator.cli import start_local_ray
    from orchestrator.spec import parse_experiment
    from orchestrator.store import default_tracking_uri
    from orchestrator.sweep import run_sweep

    start_local_ray(num_cpus=2, configure_logging=False)  # the Ray `resurgence run` starts
    uri = default_tracking_uri()
    started = time.perf_counter()

    defense = defense_data(args, tmp)
    if args.gammas:
        best = {"candidate": "given", "gammas": {k: float(v) for k, v in (g.split("=", 1) for g in args.gammas)}}
        candidates: list[dict[str, Any]] = []
    else:
        candidates, best = search(defense, uri, started)
        if best is None:
            ray.shutdown()
            return
    print(f"attacking: {best['gammas']}")

    esd = {"method": "esd", "config": defense["erase"]["config"]["method_config"]}
    chosen = copy.deepcopy(defense["erase"])
    chosen["config"].update(best["gammas"])
    fresh: dict[str, list[dict[str, Any]]] = {"ESD-x": [], "meta (best candidate)": []}
    for label, erase in (("ESD-x", esd), ("meta (best candidate)", chosen)):
        for seed in args.seeds:
            data = attack_data(defense, erase, seed, "esd" if label == "ESD-x" else "meta")
            result = run_sweep(parse_experiment(data), uri, "toy_defense.yaml", write_html=False, one_node=True)
            fresh[label].append({"seed": seed, **worst_case(result.rows)})
    ray.shutdown()

    print(f"\n=== fresh attacks: {args.attacks} attacker trials per seed, seeds {args.seeds} ===")
    print(
        "| erasure | attacker seed | presence after erasure | worst-case resurgence [95% CI] n | presence reached "
        "[95% CI] | its attack | retention after erasure / end |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, cases in fresh.items():
        for c in cases:
            attack = ", ".join(
                f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
                for k, v in c["config"].items()
            )
            print(
                f"| {label} | {c['seed']} | {c['presence_erased']:.2f} | "
                f"{with_interval(c['worst'], c['low'], c['high'], c['n'], signed=True)} | "
                f"{with_interval(c['reached'], *c['reached_interval'])} | {attack} | "
                f"{c['retention_erased']:.2f} / {c['retention_end']:.2f} |"
            )
    summary = {}
    for label, cases in fresh.items():
        worsts = [c["worst"] for c in cases]
        reached = [c["reached"] for c in cases]
        summary[label] = {
            "mean_reached": statistics.fmean(reached),
            "min_reached": min(reached),
            "max_reached": max(reached),
            "mean_worst": statistics.fmean(worsts),
            "min_worst": min(worsts),
            "max_worst": max(worsts),
            "sd_worst": statistics.stdev(worsts) if len(worsts) > 1 else 0.0,
            "retention_erased": cases[0]["retention_erased"],
        }
        s = summary[label]
        print(
            f"{label}: worst-case resurgence mean {s['mean_worst']:+.3f} over {len(worsts)} seeds (range "
            f"{s['min_worst']:+.3f} to {s['max_worst']:+.3f}, sd {s['sd_worst']:.3f}); presence reached mean "
            f"{s['mean_reached']:.3f} (range {s['min_reached']:.3f} to {s['max_reached']:.3f}); retention after "
            f"erasure {s['retention_erased']:.2f}"
        )
    e, m = summary["ESD-x"], summary["meta (best candidate)"]
    for what, key in (("worst-case resurgence", "mean_worst"), ("presence reached", "mean_reached")):
        reduction = 1 - m[key] / e[key] if e[key] > 0 else float("nan")
        reached = finite(reduction) and reduction >= 0.30 and m["retention_erased"] >= 0.75
        print(
            f"meta's mean {what} is {reduction:.0%} lower than ESD-x's, at retention {m['retention_erased']:.2f}: "
            f"the aim (>= 30% lower at retention >= 0.75) is {'REACHED' if reached else 'NOT reached'}"
        )
    print(f"{time.perf_counter() - started:.0f} s in all")
    if args.json:
        args.json.write_text(
            json.dumps({"candidates": candidates, "best": best, "fresh": fresh, "summary": summary}, indent=1)
        )


if __name__ == "__main__":
    main()
