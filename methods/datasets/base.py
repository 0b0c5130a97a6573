"""What every dataset shares: the images it yields, what a loader may need besides its config, the registry,
and the conversions between PIL images and the models' pixel tensors."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from methods.models import DiffusionModel
from methods.registry import Registry


@dataclass
class CaptionedImages:
    pixels: torch.Tensor  # (N, 3, R, R) in [-1, 1]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class DataContext:
    """What a loader may need besides its config."""

    resolution: int  # side in pixels the model trains at
    cache_dir: Path  # where generated datasets are kept
    model: DiffusionModel | None = None  # the base model, for `generated`
    model_key: str = ""  # a stable identity of that model (part of the cache key)
    concept_prompts: list[str] = field(default_factory=list)  # the erased concept's prompts, for `concept`


DATASETS: Registry[Callable[[Any, DataContext], CaptionedImages]] = Registry("dataset")


def to_pixels(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """PIL images -> (N, 3, R, R) in [-1, 1]: resize the short side to R, center-crop."""
    out = []
    for img in images:
        img = img.convert("RGB")
        scale = resolution / min(img.size)
        img = img.resize(
            (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))),
            Image.Resampling.BICUBIC,
        )
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)  # (R, R, 3)
        out.append(arr.permute(2, 0, 1))
    return torch.stack(out)


def to_images(pixels01: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [0, 1] -> PIL images."""
    arr = (pixels01.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def cache_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
