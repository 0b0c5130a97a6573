"""The resurgence paper's count factor on the toy world: erase 1, 2 and 3 shapes at once, fine-tune on data with none.

From search_spaces/toy_mass_erasure.yaml (loaded and changed in code): for each method (MACE with the spec's
config, UCE with `UCE_CONFIG`) and each count N, erase the first N of cross, circle, square, triangle from the
committed toy model, then fine-tune the erased model on toy images with none of the four (the spec's dataset:
diamonds and bars) over a small grid of settings (learning rate x trainable subset). Per method and count it
reports the erased shapes' mean presence before erasure and right after it, the best resurgence over the
settings (resurgence = presence at the end of the fine-tune minus presence right after erasure) and which
setting gave it, each erased shape's presence at the end of that best fine-tune, retention (the never-erased
diamond's and bar's mean presence) after erasure and at the end of the best fine-tune, and the time taken.

Every trial runs through the orchestrator's own trial function (`execute_trial`, no Ray) with a run-local erase
cache, so each method x count is erased once and its fine-tunes reuse it (the `cache` column: miss, then memo).
`--methods esd` adds a reference: ESD-x as search_spaces/toy_resurgence.yaml erases (it does revive on this data;
with several shapes its 200 iterations cycle through all their prompts and erase only part of them).

    python benchmarks/count_factor.py                     # MACE, UCE: 24 fine-tunes of 150 steps, ~12 min on 2 cores
    python benchmarks/count_factor.py --methods mace uce esd --json count_factor.json   # + ESD: ~20 min; JSON too
    python benchmarks/count_factor.py --quick             # a check that it runs: ~1.5 min (10 steps, 1 setting)

Wall times are for 2 idle cores; other processes on them stretch any cell several-fold (a run of the three methods
took 39 min while a test suite with Ray ran beside it; its undisturbed cells took 95-176 s each).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from methods.evaluation.intervals import wilson
from orchestrator.cache import open_cache
from orchestrator.formatting import with_interval
from orchestrator.resolved import resolve
from orchestrator.trial import execute_trial

SPEC = Path(__file__).resolve().parent.parent / "search_spaces" / "toy_mass_erasure.yaml"
# UCE on the toy model: every token from the shape's name on (the end and padding tokens carry it through the
# text encoder's causal attention), mapped to the start token's ("" guide), with a small ridge. With the
# official `last` token alone, erasing three shapes leaves the square (presence 0.33 after erasure) and costs
# the diamond; `all` takes every count's presence to 0.03 or less (checked while writing this benchmark).
UCE_CONFIG = {"guide": "", "tokens": "all", "lamb": 0.1}
# A reference, not in the default set (`--methods esd`): ESD-x as search_spaces/toy_resurgence.yaml erases the
# cross (with several shapes it cycles through all their prompts), the erasure whose resurgence the README shows.
ESD_ERASE = {
    "method": "esd",
    "config": {"variant": "esd-x", "iterations": 200, "lr": 5e-4, "eta": 1.0, "sample_steps": 20},
}


def erase_section(data: dict[str, Any], method: str) -> dict[str, Any]:
    if method == "mace":
        return copy.deepcopy(data["erase"])
    if method == "uce":
        return {"method": "uce", "config": dict(UCE_CONFIG)}
    if method == "esd":
        return copy.deepcopy(ESD_ERASE)
    raise ValueError(f"unknown method {method!r}")


def run_trial(data: dict[str, Any], overrides: dict[str, Any], cache: Any, folder: Path) -> list[dict[str, Any]]:
    curve: list[dict[str, Any]] = []
    execute_trial(resolve(data, overrides), lambda metrics, *_: curve.append(metrics), folder, cache)
    return curve


def shape_presence(report: dict[str, Any], targets: list[str]) -> dict[str, float]:
    """Each erased shape's presence in a report (a single target's is `presence` itself)."""
    if len(targets) == 1:
        return {targets[0]: report["presence"]}
    return {t: report[f"presence.{t}"] for t in targets}


def fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=["mace", "uce"], choices=["mace", "uce", "esd"])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 5e-4])
    parser.add_argument("--trainables", nargs="+", default=["full", "xattn"])
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps per trial")
    parser.add_argument("--every", type=int, default=50, help="evaluate every N fine-tuning steps")
    parser.add_argument("--images-per-prompt", type=int, default=2, help="evaluation images per prompt (6 prompts)")
    parser.add_argument("--quick", action="store_true", help="a check that it runs: 10 steps, one setting, 1 image")
    parser.add_argument("--json", type=Path, help="write every trial's reports and the summary here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.every, args.images_per_prompt = 10, 5, 1
        args.lrs, args.trainables = [5e-4], ["xattn"]
    torch.set_num_threads(args.threads)

    data = yaml.safe_load(SPEC.read_text())
    data.pop("search")
    data.pop("smoke", None)
    data["evaluate"]["config"]["images_per_prompt"] = args.images_per_prompt
    if args.quick:
        data["erase"]["config"]["steps"] = 5  # MACE's LoRA steps per shape (the spec's smoke value)
    every = [c["name"] for c in data["concept"]]
    never = [c["name"] for c in data["others"]]
    settings = list(itertools.product(args.lrs, args.trainables))
    print(
        f"toy world; erased in order {every}, never erased {never}; fine-tune data {data['finetune']['dataset']}; "
        f"{args.steps} steps (batch {data['finetune']['config']['batch_size']}, AdamW), evaluated every {args.every} "
        f"on {args.images_per_prompt * 6} images per shape; settings: lr {args.lrs} x {args.trainables}",
        flush=True,
    )
    print(f"mace: {data['erase']['config']}\nuce:  {UCE_CONFIG}\n", flush=True)
    print(f"{'method':6s} {'N':>2s} {'lr':>7s} {'trainable':9s} {'cache':5s} {'erased':>6s}  curve (step:presence)  "
          f"{'resurg':>6s} {'retent':>6s} {'s':>5s}", flush=True)  # fmt: skip

    start = time.perf_counter()
    rows, trials = [], []
    with tempfile.TemporaryDirectory(prefix="count-factor-") as tmp:
        root = Path(tmp)
        cache = open_cache(str(root / "storage"), root / "staging")
        for method, count in itertools.product(args.methods, args.counts):
            cell_start = time.perf_counter()
            spec = {**data, "erase": erase_section(data, method), "erase_count": count, "cache_dir": str(root / "data")}
            targets = every[:count]
            cell = []
            for i, (lr, trainable) in enumerate(settings):
                overrides = {
                    "finetune.config.lr": lr,
                    "finetune.config.trainable": trainable,
                    "finetune.config.steps": args.steps,
                    "finetune.eval_every": args.every,
                }
                t0 = time.perf_counter()
                curve = run_trial(spec, overrides, cache, root / f"{method}-{count}-{i}")
                seconds = time.perf_counter() - t0
                first, last = curve[0], curve[-1]
                points = " ".join(f"{r['ft_step']}:{r['presence']:.2f}" for r in curve[1:] if "presence" in r)
                print(
                    f"{method:6s} {count:2d} {lr:7.0e} {trainable:9s} {first['erase_cache']:5s} "
                    f"{first['presence_erased']:6.2f}  {points}  {last['resurgence']:+6.2f} {last['retention']:6.2f} "
                    f"{seconds:5.0f}",
                    flush=True,
                )
                trial = {
                    "method": method,
                    "count": count,
                    "targets": targets,
                    "lr": lr,
                    "trainable": trainable,
                    "seconds": seconds,
                    "curve": [{k: v for k, v in r.items() if isinstance(v, int | float | str)} for r in curve],
                }
                cell.append(trial)
                trials.append(trial)
            finals = {t["curve"][-1]["resurgence"] for t in cell} if len(cell) > 1 else {0.0, 1.0}
            best = max(cell, key=lambda t: (t["curve"][-1]["resurgence"], max(r["resurgence"] for r in t["curve"])))
            first, end = best["curve"][0], best["curve"][-1]
            rows.append(
                {
                    "method": method,
                    "count": count,
                    "targets": targets,
                    "presence_base": first["presence_base"],
                    "presence_erased": first["presence_erased"],
                    "presence_erased_each": shape_presence(first, targets),
                    "n": first["presence_images"],  # the erased shapes' images: each figure's 95% interval over them
                    "presence_erased_interval": wilson(first["presence_erased"], first["presence_images"]),
                    "best_resurgence_interval": (end["resurgence_lo"], end["resurgence_hi"]),
                    "best_resurgence": end["resurgence"],
                    "best_setting": f"{best['lr']:.0e} {best['trainable']}" if len(finals) > 1 else "all equal",
                    "peak_resurgence": max(r["resurgence"] for t in cell for r in t["curve"]),
                    "presence_end": end["presence"],
                    "presence_end_each": shape_presence(end, targets),
                    "retention_base": first["retention_base"],
                    "retention_erased": first["retention_erased"],
                    "retention_end": end["retention"],
                    "final_resurgence_by_setting": {
                        f"{t['lr']:.0e} {t['trainable']}": t["curve"][-1]["resurgence"] for t in cell
                    },
                    "erase_seconds": first["erase_seconds"],
                    "seconds": time.perf_counter() - cell_start,
                }
            )
    total = time.perf_counter() - start

    print(
        f"\nbest resurgence: the largest over the {len(settings)} settings of the erased shapes' mean presence after "
        f"{args.steps} steps minus right after erasure (peak: the largest at any evaluation of any setting); "
        f"retention: mean presence of {', '.join(never)} (base -> after erasure -> end of the best fine-tune). "
        f"{len(trials)} fine-tunes in {total:.0f} s.\n"
    )
    print(
        "| method | erased | presence base | presence after erasure [95% CI] n | best resurgence [95% CI] (setting) | "
        "peak resurgence | erased shapes at end of best | retention base / erased / end | erase s | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        each = ", ".join(f"{k} {v:.2f}" for k, v in r["presence_end_each"].items())
        print(
            f"| {r['method'].upper()} | {r['count']} ({', '.join(r['targets'])}) | {fmt(r['presence_base'])} | "
            f"{with_interval(r['presence_erased'], *r['presence_erased_interval'], r['n'])} | "
            f"{with_interval(r['best_resurgence'], *r['best_resurgence_interval'], signed=True)} "
            f"({r['best_setting']}) | "
            f"{r['peak_resurgence']:+.2f} | {each} | "
            f"{fmt(r['retention_base'])} / {fmt(r['retention_erased'])} / {fmt(r['retention_end'])} | "
            f"{r['erase_seconds']:.2f} | {r['seconds']:.0f} |"
        )
    if args.json is not None:
        out = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "uce": UCE_CONFIG}
        out |= {
            "mace": data["erase"]["config"],
            "esd": ESD_ERASE["config"],
            "seconds": total,
            "summary": rows,
            "trials": trials,
        }
        args.json.write_text(json.dumps(out, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
