"""MACE erasing 1, 10 and 100 concepts at once on the tiny SD model: erase time and the process's peak memory,
each count in a fresh process (side by side in one run), so the cost of the number of erased concepts (the
resurgence paper's factor) is seen before it is paid on SD v1.4.

    python benchmarks/bench_mass_erasure.py                  # 1, 10, 100 concepts, 1 LoRA step each
    python benchmarks/bench_mass_erasure.py --counts 1 5 10 --steps 5

Each concept has two prompts and one image (a folder, as in tests/test_mace.py: drawing the images is not
what is measured); the preservation cache holds one other concept. Figures: seconds for `mace.erase` and the
peak resident memory of the process (model included), with the ratios to one concept.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(n: int, steps: int) -> dict:
    sys.path.insert(0, str(REPO))
    from PIL import Image

    from methods.datasets.base import DataContext
    from methods.erasers import mace
    from methods.erasers.base import Concept, EraseRequest
    from methods.models import load_model

    model = load_model("tiny-sd", {"seed": 0})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(n):
            (root / "img" / f"thing{i}").mkdir(parents=True)
            Image.new("RGB", (16, 16), (i % 256, 100, 200)).save(root / "img" / f"thing{i}" / "0.png")
        ctx = DataContext(resolution=model.resolution, cache_dir=root, model=model, model_key="tiny")
        targets = [Concept(f"thing{i}", [f"a photo of thing{i}", f"thing{i} in a field"]) for i in range(n)]
        request = EraseRequest(targets=targets, preserve=[Concept("square", ["a square"])], data=ctx)
        cfg = mace.MACEConfig(mapping="a dog", steps=steps, lr=1e-3, image_folder=str(root / "img"))
        start = time.perf_counter()
        mace.erase(model, request, cfg)
        seconds = time.perf_counter() - start
    return {"concepts": n, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--steps", type=int, default=1, help="LoRA steps per concept")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process: one count
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.steps)))
        return
    rows = []
    for n in args.counts:
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(n), "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"MACE on tiny-sd, {args.steps} LoRA step(s) per concept, each count in a fresh process")
    print(f"{'concepts':>9} {'erase s':>9} {'x':>7} {'peak RSS MB':>12} {'x':>6}")
    for r in rows:
        print(
            f"{r['concepts']:>9} {r['seconds']:>9.2f} {r['seconds'] / base['seconds']:>7.1f} "
            f"{r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] / base['peak_rss_mb']:>6.2f}"
        )


if __name__ == "__main__":
    main()
