"""Meta-unlearning on the toy world: resurgence after the relearning attack, with and without the meta
term, same erasure budget and same attack, side by side (issue 4).

Both models are erased with ESD-x on "cross" (200 steps, the main job's settings); the meta model adds the
meta term of methods/erasers/meta.py at every step. Then the same attack hits both: fine-tuning the whole UNet on
real renders of crosses (the relearning attack of the meta-unlearning paper), with the presence of the
cross measured every `--every` steps on the same seeds.

    python benchmarks/bench_meta.py                       # ~15 min on 2 cores
    python benchmarks/bench_meta.py --gamma2 0.1 --gamma2-3 0     # a stronger meta term, no ascent on others
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from methods import toyworld
from methods.datasets.base import DataContext
from methods.detectors.base import load_detector
from methods.erasers import esd, meta
from methods.erasers.base import Concept, EraseRequest
from methods.evaluation.presence import EvalConfig, evaluate
from methods.finetune import FinetuneConfig, finetune
from methods.models import load_model

ESD = {"variant": "esd-x", "iterations": 200, "lr": 5e-4, "sample_steps": 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concept", default="cross", choices=toyworld.SHAPES)
    parser.add_argument("--gamma1", type=float, default=0.1, help="gamma1_1 (unrelated set at theta)")
    parser.add_argument("--gamma2", type=float, default=0.01, help="gamma2_1 (harmful test set at theta')")
    parser.add_argument("--gamma2-3", type=float, default=None, help="gamma2_3 (unrelated at theta'); default gamma2")
    parser.add_argument("--inner-steps", type=int, default=3)
    parser.add_argument("--attack-lr", type=float, default=1e-4)
    parser.add_argument("--attack-steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--images-per-prompt", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)

    model = load_model("toy")
    detector = load_detector("toy", {}, model.device)
    concepts = [Concept(s, toyworld.concept_prompts(s)) for s in toyworld.SHAPES]
    target = [c for c in concepts if c.name == args.concept]
    others = [c for c in concepts if c.name != args.concept]
    eval_cfg = EvalConfig(images_per_prompt=args.images_per_prompt, steps=20, guidance_scale=3.0)
    meta_cfg = meta.MetaConfig(
        method="esd",
        method_config=ESD,
        outer_steps=ESD["iterations"],
        inner_steps=args.inner_steps,
        inner_lr=args.attack_lr,  # the simulated attack is the real one's optimizer and learning rate
        batch_size=6,
        gamma1_1=args.gamma1,
        gamma2_1=args.gamma2,
        gamma2_3=args.gamma2 if args.gamma2_3 is None else args.gamma2_3,
        harmful=meta.ImageSet(images_per_prompt=2),
        unrelated=meta.ImageSet(images_per_prompt=1),
        image_steps=20,
        image_guidance=3.0,
    )
    attack_data = toyworld.toy_data(
        toyworld.ToyDataConfig(n=36, shapes=[args.concept], seed=7), DataContext(resolution=16, cache_dir=Path("."))
    )
    attack = FinetuneConfig(trainable="full", lr=args.attack_lr, steps=args.attack_steps, batch_size=8, seed=3)
    print(
        f"meta: gamma1_1 {meta_cfg.gamma1_1}, gamma2_1 {meta_cfg.gamma2_1}, gamma2_3 {meta_cfg.gamma2_3}, "
        f"inner steps {args.inner_steps}"
    )
    curves: dict[str, list[tuple[int, float]]] = {}
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        ctx = DataContext(resolution=model.resolution, cache_dir=Path(tmp), model=model, model_key="toy")
        request = EraseRequest(targets=target, preserve=others, data=ctx)
        for label in ("ESD-x", "ESD-x + meta"):
            erased = copy.deepcopy(model)
            start = time.perf_counter()
            if label == "ESD-x":
                esd.erase(erased, request, esd.ESDConfig(**ESD))
            else:
                meta.erase(erased, request, meta_cfg)
            seconds = time.perf_counter() - start
            ev = evaluate(erased, detector, concepts, eval_cfg)
            curve = [(0, ev.presence[args.concept])]

            def on_eval(step: int, loss: float, erased: object = erased, curve: list = curve) -> None:
                curve.append((step, evaluate(erased, detector, target, eval_cfg).presence[args.concept]))

            finetune(erased, attack_data, attack, every=args.every, callback=on_eval)
            after = evaluate(erased, detector, concepts, eval_cfg)
            curves[label] = curve
            summary[label] = (seconds, ev.retention(args.concept), after.retention(args.concept))
            print(f"{label}: erased in {seconds:.0f} s; presence {curve[0][1]:.3f}", flush=True)
    print(f"\nrelearning attack: full UNet, AdamW lr {args.attack_lr}, batch 8, on {len(attack_data)} crosses")
    print(f"{'step':>5s} {'ESD-x':>8s} {'+ meta':>8s}   presence of {args.concept!r}")
    for (step, a), (_, b) in zip(curves["ESD-x"], curves["ESD-x + meta"], strict=True):
        print(f"{step:5d} {a:8.3f} {b:8.3f}")
    for label, (_, ret, ret_after) in summary.items():
        res = curves[label][-1][1] - curves[label][0][1]
        print(f"{label:13s} resurgence {res:+.3f}; retention {ret:.3f} after erasure, {ret_after:.3f} after the attack")


if __name__ == "__main__":
    main()
