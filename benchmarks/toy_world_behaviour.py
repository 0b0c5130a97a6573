"""Does the toy world behave? Base presence of every shape, then ESD erasing one shape: its presence and
the other shapes' presence, measured with the committed toy model and detector.

    python benchmarks/toy_world_behaviour.py                      # erase cross with the main job's ESD-x
    python benchmarks/toy_world_behaviour.py --concept bar --variant esd-u --iterations 200

Targets (issue 3): base presence of each shape >= 0.8; after erasure the erased shape <= 0.15 and every
other shape falls by at most 0.15.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from methods import toyworld
from methods.detectors.base import load_detector
from methods.erasers import esd
from methods.erasers.base import Concept, EraseRequest
from methods.evaluation.presence import EvalConfig, evaluate
from methods.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concept", default="cross", choices=toyworld.SHAPES)
    parser.add_argument("--variant", default="esd-x")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--images-per-prompt", type=int, default=8)
    parser.add_argument("--bare", action="store_true", help="erase the bare word (official ESD) not its prompts")
    args = parser.parse_args()
    torch.set_num_threads(2)

    model = load_model("toy")
    detector = load_detector("toy", {}, model.device)
    concepts = [Concept(s, toyworld.concept_prompts(s)) for s in toyworld.SHAPES]
    synonyms = [Concept(s, toyworld.concept_prompts(s, synonyms=True)) for s in toyworld.SHAPES]
    cfg = EvalConfig(images_per_prompt=args.images_per_prompt, steps=20, guidance_scale=3.0)

    start = time.perf_counter()
    base = evaluate(model, detector, concepts, cfg)
    base_syn = evaluate(model, detector, synonyms, cfg)
    print(
        f"base model ({time.perf_counter() - start:.0f} s): presence of each shape on its own prompts "
        f"({6 * args.images_per_prompt} images each) / on its synonym's prompts"
    )
    for s in toyworld.SHAPES:
        print(f"  {s:9s} {base.presence[s]:.3f} / {base_syn.presence[s]:.3f}")

    erased = copy.deepcopy(model)
    esd_cfg = esd.ESDConfig(variant=args.variant, iterations=args.iterations, lr=args.lr, eta=args.eta, sample_steps=20)
    start = time.perf_counter()
    prompts = [args.concept] if args.bare else toyworld.concept_prompts(args.concept)
    esd.erase(erased, EraseRequest([Concept(args.concept, prompts)]), esd_cfg)
    seconds = time.perf_counter() - start
    after = evaluate(erased, detector, concepts, cfg)
    after_syn = evaluate(erased, detector, synonyms, cfg)
    print(
        f"\nESD {args.variant} on {args.concept!r} ({args.iterations} iterations, lr {args.lr}, eta {args.eta}, "
        f"{seconds:.0f} s): presence after erasure (change from base), own prompts / synonym prompts"
    )
    worst_drop = 0.0
    for s in toyworld.SHAPES:
        drop = base.presence[s] - after.presence[s]
        if s != args.concept:
            worst_drop = max(worst_drop, drop)
        print(f"  {s:9s} {after.presence[s]:.3f} ({-drop:+.3f}) / {after_syn.presence[s]:.3f}")
    ok_base = all(v >= 0.8 for v in base.presence.values())
    ok_erased = after.presence[args.concept] <= 0.15
    print(
        f"\nbase presence >= 0.8 for every shape: {ok_base}; erased shape <= 0.15: {ok_erased}; "
        f"largest drop of another shape: {worst_drop:.3f} (target <= 0.15)"
    )


if __name__ == "__main__":
    main()
