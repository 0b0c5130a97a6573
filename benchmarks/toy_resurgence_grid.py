"""Resurgence on the toy world over a small grid of fine-tuning choices (issue 3's study).

Erase "cross" from the committed toy model with ESD-x (the main job's erasure, and optionally a weaker
one), then fine-tune the erased model on data with no cross in it, over a grid of learning rate x
trainable subset x data choice, evaluating the cross's presence every `--every` steps. Data choices:

- `others`: every other shape (the main job's data);
- `near`:   diamonds and circles, the shapes closest to the cross in the detector's embedding (cosine of
            mean embeddings 0.91 and 0.87);
- `far`:    bars and squares, the farthest (0.65 and 0.66);
- `cross`:  images *of* the cross (the malicious relearning attack, an upper reference).

Each row prints the data's closeness to the cross (cosine between mean detector embeddings) and the
resurgence curve. Every trial runs through the orchestrator's own trial function (no Ray), so the numbers
are the ones a sweep would report.

    python benchmarks/toy_resurgence_grid.py                     # ~15 min on 2 cores
    python benchmarks/toy_resurgence_grid.py --erase-lr 3e-4     # a weaker erasure
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
import yaml

from orchestrator.resolved import resolve
from orchestrator.trial import execute_trial

SPEC = Path(__file__).resolve().parent.parent / "search_spaces" / "toy_resurgence.yaml"
DATA = {
    "others": {"exclude": ["cross"]},
    "near": {"shapes": ["diamond", "circle"]},
    "far": {"shapes": ["bar", "square"]},
    "cross": {"shapes": ["cross"]},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 5e-4])
    parser.add_argument("--trainables", nargs="+", default=["full", "xattn", "lora"])
    parser.add_argument("--data", nargs="+", default=list(DATA), choices=list(DATA))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--erase-lr", type=float, default=None, help="ESD lr (default: the main job's)")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)

    data = yaml.safe_load(SPEC.read_text())
    data.pop("search")
    data["evaluate"]["config"]["images_per_prompt"] = args.images_per_prompt
    if args.erase_lr is not None:
        data["erase"]["config"]["lr"] = args.erase_lr
    print(f"erase: {data['erase']}; eval: {data['evaluate']['config']}; fine-tune batch 8, AdamW")
    print(f"{'lr':>7s} {'trainable':9s} {'data':6s} {'close':>6s} {'erased':>6s}  resurgence at steps")
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lr, trainable, choice in itertools.product(args.lrs, args.trainables, args.data):
            overrides = {
                "finetune.config.lr": lr,
                "finetune.config.trainable": trainable,
                "finetune.config.steps": args.steps,
                "finetune.eval_every": args.every,
                "finetune.dataset.config": {"n": 216, "seed": 1, **DATA[choice]},
                "cache_dir": tmp,
            }
            curve: list[dict] = []
            execute_trial(resolve(data, overrides), curve.append, Path(tmp) / "trial")
            first = curve[0]
            points = "  ".join(f"{r['ft_step']}:{r['resurgence']:+.2f}" for r in curve[1:])
            print(
                f"{lr:7.0e} {trainable:9s} {choice:6s} {first['data_closeness']:6.3f} {first['presence_erased']:6.3f}  "
                f"{points}   (retention {curve[-1]['retention']:.2f}, ft_distance {curve[-1]['ft_distance']:.2f})",
                flush=True,
            )
            rows.append((lr, trainable, choice, curve))
    print(
        f"\nbase presence {rows[0][3][0]['presence_base']:.3f}, erase distance {rows[0][3][0]['erase_distance']:.2f}; "
        f"{len(rows)} fine-tunes in {time.perf_counter() - start:.0f} s"
    )
    for choice in args.data:
        finals = [c[-1]["resurgence"] for _, _, d, c in rows if d == choice]
        print(f"  data {choice:6s}: mean final resurgence {sum(finals) / len(finals):+.3f}, max {max(finals):+.3f}")


if __name__ == "__main__":
    main()
