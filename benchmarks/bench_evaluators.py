"""What each evaluator costs per image: NudeNet (the bundled 320n ONNX model), a ResNet-50 ImageNet classifier,
CLIP ViT-B/32 zero-shot, and the FID Inception network, at the toy world's 16 px and at SD v1.4's 512 px
(SDXL's 1024 px with --sdxl), measured side by side in one process.

    python benchmarks/bench_evaluators.py                 # on this machine's CPU (all its cores)
    python benchmarks/bench_evaluators.py --device cuda --sdxl --batch 40

The networks have random weights (the cost of a forward pass does not depend on them; no weights file is
needed). Each row: milliseconds per image at the batch size given (the mean of --repeat timed batches after
one warm-up), and the time of one 40-image evaluation (the presence evaluation the README's GPU figures
assume per concept). NudeNet's cost includes its own preprocessing (padding and resizing to 320 px on the
CPU) and box post-processing; the torch networks' includes their resizing to 224 or 299 px.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods.detectors.clip import ClipConfig, ClipZeroShot  # noqa: E402
from methods.detectors.imagenet import ImageNetClassifier, ImageNetConfig  # noqa: E402
from methods.detectors.nudenet import NudeNetConfig, NudeNetDetector  # noqa: E402
from methods.evaluation.utility import fid_inception  # noqa: E402

EVAL_IMAGES = 40


def evaluators(device: torch.device, batch: int) -> dict:
    nudenet = NudeNetDetector(NudeNetConfig(batch_size=batch))
    resnet = ImageNetClassifier(ImageNetConfig(weights=None, arch="resnet50", batch_size=batch), device)
    clip = ClipZeroShot(ClipConfig(model="ViT-B-32", pretrained=None), device)
    inception = fid_inception(seed=0).eval().to(device)
    inception.fc = torch.nn.Identity()
    classes = ["a cat", "a dog", "a car", "a landscape"]

    @torch.no_grad()
    def fid(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x.to(device), size=(299, 299), mode="bilinear")
        return inception(2 * x - 1)

    return {
        "nudenet": lambda x: nudenet.detect(x, ["nudity"]),
        "resnet50": lambda x: resnet.detect(x, ["tench"]),
        "clip-vit-b-32": lambda x: clip.detect(x, classes),
        "fid-inception": fid,
    }


def timed(fn, images: torch.Tensor, repeat: int, device: torch.device) -> float:
    fn(images)  # warm-up (kernels, ONNX session, zero-shot head)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat / images.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8, help="images per call")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sdxl", action="store_true", help="also at 1024 px")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = [16, 512] + ([1024] if args.sdxl else [])
    found = evaluators(device, args.batch)
    g = torch.Generator().manual_seed(0)
    print(
        f"device {device}, {torch.get_num_threads()} threads, batch {args.batch}; ms per image "
        f"(and s per {EVAL_IMAGES}-image evaluation)"
    )
    print(f"{'evaluator':<16}" + "".join(f"{f'{s} px':>22}" for s in sizes))
    result: dict[str, dict[int, float]] = {}
    for name, fn in found.items():
        result[name] = {}
        cells = []
        for size in sizes:
            images = torch.rand(args.batch, 3, size, size, generator=g)
            per_image = timed(fn, images, args.repeat, device)
            result[name][size] = per_image
            cells.append(f"{per_image * 1e3:9.1f} ms ({per_image * EVAL_IMAGES:5.2f} s)")
        print(f"{name:<16}" + "".join(f"{c:>22}" for c in cells))
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "batch": args.batch, "seconds_per_image": result}))


if __name__ == "__main__":
    main()
