"""Presence and retention of concepts on images the model generates, as a detector decides.

Images use fixed seeds (image i of every prompt uses seed + i): the same model gives the same numbers,
and different models are compared on the same noise (common random numbers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from methods.detectors.base import Detector
from methods.erasers.base import Concept
from methods.models import DiffusionModel


class EvalConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    images_per_prompt: int = Field(2, ge=1)  # papers use 25-100 images per concept in all
    steps: int = Field(20, ge=1)  # DDIM steps per image
    guidance_scale: float = Field(7.5, ge=0)
    seed: int = 0  # image i of every prompt uses seed + i
    batch_size: int = Field(16, ge=1)  # images generated at once
    extra_classes: list[str] = Field(default_factory=list)  # more class names for the detector to choose


@dataclass(frozen=True)
class Evaluation:
    presence: dict[str, float]  # concept name -> presence
    samples: dict[str, torch.Tensor]  # concept name -> its first image, (3, H, W) in [0, 1]
    embeddings: dict[str, torch.Tensor]  # concept name -> mean detector embedding of its images, (D,);
    # only when asked for (evaluate(..., embed=True)): it costs a second pass of the detector

    def retention(self, erased: str) -> float:
        others = [v for k, v in self.presence.items() if k != erased]
        return sum(others) / len(others) if others else float("nan")


def evaluate(
    model: DiffusionModel, detector: Detector, concepts: list[Concept], cfg: EvalConfig, *, embed: bool = False
) -> Evaluation:
    classes = [c.name for c in concepts] + list(cfg.extra_classes)
    presence: dict[str, float] = {}
    samples: dict[str, torch.Tensor] = {}
    embeddings: dict[str, torch.Tensor] = {}
    for k, concept in enumerate(concepts):
        jobs = [(p, cfg.seed + i) for p in concept.prompts for i in range(cfg.images_per_prompt)]
        hits = 0
        total = None
        for start in range(0, len(jobs), cfg.batch_size):
            chunk = jobs[start : start + cfg.batch_size]
            images = model.generate(
                [p for p, _ in chunk], [s for _, s in chunk], steps=cfg.steps, guidance_scale=cfg.guidance_scale
            )
            if start == 0:
                samples[concept.name] = images[0]
            hits += int((detector.classify(images, classes) == k).sum())
            if embed:
                summed = detector.embed(images).sum(0).cpu()
                total = summed if total is None else total + summed
        presence[concept.name] = hits / len(jobs)
        if embed:
            embeddings[concept.name] = total / len(jobs)
    return Evaluation(presence, samples, embeddings)


@torch.no_grad()
def mean_embedding(detector: Detector, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Mean detector embedding (D,) of images (N, 3, H, W) in [-1, 1] (a dataset's pixels)."""
    total = None
    for start in range(0, pixels.shape[0], batch_size):
        summed = detector.embed((pixels[start : start + batch_size] + 1) / 2).sum(0).cpu()
        total = summed if total is None else total + summed
    return total / pixels.shape[0]


def closeness(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine between two mean embeddings: how close a fine-tuning set is to a concept (docs/background.md §4)."""
    return float(F.cosine_similarity(a.float(), b.float(), dim=0))


def data_closeness(detector: Detector, pixel_sets: list[torch.Tensor], concept: torch.Tensor) -> float:
    """Closeness of all the images of several datasets ((N_i, 3, H, W) in [-1, 1]) to a concept's mean embedding."""
    return closeness(mean_embedding(detector, torch.cat(pixel_sets)), concept)


# -- persistence (the erase cache stores the erased model's evaluation next to its weights) ------------
def save_evaluation(ev: Evaluation, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps({"presence": ev.presence}))
    tensors = {f"sample.{k}": v.contiguous() for k, v in ev.samples.items()}
    tensors |= {f"embedding.{k}": v.contiguous() for k, v in ev.embeddings.items()}
    save_file(tensors, str(folder / "evaluation.safetensors"))


def load_evaluation(folder: Path) -> Evaluation:
    from safetensors.torch import load_file

    presence = json.loads((folder / "evaluation.json").read_text())["presence"]
    tensors = load_file(str(folder / "evaluation.safetensors"))
    pick = lambda prefix: {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    return Evaluation(presence, pick("sample."), pick("embedding."))
