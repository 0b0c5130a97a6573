"""Every eraser on the toy world, in one run: presence of the erased shape, retention of the others, and
erase wall time (issue 4). Also the few-shot paper's speed claim (60-900x faster than ESD), measured here
as ESD's time over few-shot's, both at their official defaults and at the toy-world settings below.

    python benchmarks/bench_methods.py                 # erase "cross"; ~10 min on 2 cores
    python benchmarks/bench_methods.py --concept bar --images-per-prompt 4

Images a method draws of its concept (few-shot, MACE) are drawn once before timing (they are cached
between trials in a sweep); the time to draw them is printed separately.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from methods import toyworld
from methods.catalog import METHODS
from methods.datasets.base import DataContext
from methods.detectors.base import load_detector
from methods.erasers.base import Concept, EraseRequest
from methods.evaluation.presence import EvalConfig, evaluate
from methods.models import load_model

# The toy-world settings: the official defaults where they work, the learning rates and steps scaled up
# where the official values (for SD v1.4's 860M parameters) do not move a 3M-parameter model.
TOY = {
    "none": {},
    "esd-x": ("esd", {"variant": "esd-x", "iterations": 200, "lr": 5e-4, "sample_steps": 20}),
    "esd-u": ("esd", {"variant": "esd-u", "iterations": 200, "lr": 1e-4, "sample_steps": 20}),
    "uce": ("uce", {"guide": "", "tokens": "all"}),
    "uce-last": ("uce", {"guide": "", "tokens": "last"}),
    "mace": ("mace", {"mapping": "", "lamb": 1.0, "lr": 2e-3, "train_preserve_scale": 1.0, "fuse_preserve_scale": 1.0}),
    "fewshot": ("fewshot", {"templates": "object", "lr": 3e-3}),
}
DRAWING = {"image_guidance": 3.0, "image_steps": 20}  # how the toy model draws (evaluation's settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concept", default="cross", choices=toyworld.SHAPES)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=list(TOY), choices=list(TOY))
    args = parser.parse_args()
    torch.set_num_threads(2)

    model = load_model("toy")
    detector = load_detector("toy", {}, model.device)
    concepts = [Concept(s, toyworld.concept_prompts(s)) for s in toyworld.SHAPES]
    target = [c for c in concepts if c.name == args.concept]
    others = [c for c in concepts if c.name != args.concept]
    cfg = EvalConfig(images_per_prompt=args.images_per_prompt, steps=20, guidance_scale=3.0)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = DataContext(resolution=model.resolution, cache_dir=Path(tmp), model=model, model_key="toy")
        request = EraseRequest(targets=target, preserve=others, data=ctx)
        base = evaluate(model, detector, concepts, cfg)
        print(
            f"erasing {args.concept!r} from the toy model; {6 * args.images_per_prompt} images per shape\n"
            f"{'method':10s} {'presence':>8s} {'retention':>9s} {'erase s':>8s}  (draw s)  config"
        )
        print(
            f"{'base':10s} {base.presence[args.concept]:8.3f} {base.retention(args.concept):9.3f} {'':>8s}  {'':8s}  -"
        )
        times: dict[str, float] = {}
        for label in args.methods:
            name, options = TOY[label] if TOY[label] else ("none", {})
            entry = METHODS.get(name)
            if name in ("mace", "fewshot"):
                options = {**DRAWING, **options}
            config = entry.config.model_validate(options)
            erased = copy.deepcopy(model)
            draw = _draw_first(name, config, copy.deepcopy(model), request)
            start = time.perf_counter()
            entry.obj.erase(erased, request, config)
            times[label] = time.perf_counter() - start
            ev = evaluate(erased, detector, concepts, cfg)
            print(
                f"{label:10s} {ev.presence[args.concept]:8.3f} {ev.retention(args.concept):9.3f} "
                f"{times[label]:8.2f}  ({max(0.0, draw - times[label]):5.1f} s)  {options}",
                flush=True,
            )

        # The speed claim at the official defaults (SD-sized recipes, run on the toy model).
        official = {}
        for name in ("esd", "fewshot"):
            entry = METHODS.get(name)
            config = entry.config.model_validate(DRAWING if name == "fewshot" else {})
            _draw_first(name, config, copy.deepcopy(model), request)
            erased = copy.deepcopy(model)
            start = time.perf_counter()
            entry.obj.erase(erased, request, config)
            official[name] = time.perf_counter() - start
    print(
        f"\nESD / few-shot wall time: {official['esd'] / official['fewshot']:.0f}x at the official defaults "
        f"(ESD 200 iterations, 50 sampling steps: {official['esd']:.1f} s; few-shot 10 steps: "
        f"{official['fewshot']:.2f} s)"
    )
    if "esd-x" in times and "fewshot" in times:
        print(f"ESD-x / few-shot wall time at the toy settings above: {times['esd-x'] / times['fewshot']:.0f}x")


def _draw_first(name: str, config: object, model: object, request: EraseRequest) -> float:
    """Run a method that draws images once on a throwaway copy, so the images are cached and the timed
    run excludes drawing them; returns the seconds of that cold run."""
    if name not in ("mace", "fewshot"):
        return 0.0
    start = time.perf_counter()
    METHODS.get(name).obj.erase(model, request, config)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
