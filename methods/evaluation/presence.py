"""Presence and retention of concepts on images the model generates, as a detector decides.

Images use fixed seeds (image i of a prompt uses seed + i, the prompt's own seed where its prompt set gives
one, as I2P's evaluation_seed, else the config's): the same model gives the same numbers, and different models
are compared on the same noise (common random numbers).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from methods.detectors.base import Detector
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
class Prompt:
    text: str
    seed: int | None = None  # image i uses seed + i; None: EvalConfig.seed
    guidance: float | None = None  # None: EvalConfig.guidance_scale


@dataclass(frozen=True)
class EvalConcept:
    name: str  # the name the detector is asked about
    prompts: list[Prompt | str]  # what draws it (a spec's prompts, or its prompt set's rows); a plain string
    # is a prompt with the config's seed and guidance (so an eraser's Concept evaluates as it is)


@dataclass(frozen=True)
class Evaluation:
    presence: dict[str, float]  # concept name -> presence
    samples: dict[str, torch.Tensor]  # concept name -> its first image, (3, H, W) in [0, 1]
    embeddings: dict[str, torch.Tensor]  # concept name -> mean detector embedding of its images, (D,);
    # only when asked for (evaluate(..., embed=True)) and the detector has embeddings
    images: dict[str, int] = field(default_factory=dict)  # concept name -> images judged (presence's n)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # concept -> detector class -> images

    def retention(self, erased: str | Collection[str]) -> float:
        """Mean presence of the concepts not erased (nan when there are none)."""
        gone = {erased} if isinstance(erased, str) else set(erased)
        others = [v for k, v in self.presence.items() if k not in gone]
        return sum(others) / len(others) if others else float("nan")

    def mean_embedding(self, names: Collection[str]) -> torch.Tensor | None:
        """The mean of several concepts' mean embeddings (None without embeddings)."""
        found = [self.embeddings.get(n) for n in names]
        if not found or any(v is None for v in found):
            return None
        return torch.stack(found).mean(0)

    def mean_presence(self, names: Collection[str]) -> float:
        """Mean presence over several concepts (the erased set of a mass erasure)."""
        return sum(self.presence[n] for n in names) / len(names)


def jobs(concept: EvalConcept, cfg: EvalConfig) -> list[list[tuple[str, int, float]]]:
    """The (prompt, seed, guidance) of each image of a concept, in batches of at most cfg.batch_size that share
    one guidance scale (one sampler call each), in prompt order within a guidance scale."""
    by_guidance: dict[float, list[tuple[str, int, float]]] = {}
    for p in concept.prompts:
        p = p if isinstance(p, Prompt) else Prompt(p)
        g = cfg.guidance_scale if p.guidance is None else p.guidance
        base = cfg.seed if p.seed is None else p.seed
        by_guidance.setdefault(g, []).extend((p.text, base + i, g) for i in range(cfg.images_per_prompt))
    return [
        group[start : start + cfg.batch_size]
        for group in by_guidance.values()
        for start in range(0, len(group), cfg.batch_size)
    ]


def evaluate(
    model: DiffusionModel, detector: Detector, concepts: list[EvalConcept], cfg: EvalConfig, *, embed: bool = False
) -> Evaluation:
    names = [c.name for c in concepts]
    classes = names + [n for n in cfg.extra_classes if n not in names]
    presence: dict[str, float] = {}
    samples: dict[str, torch.Tensor] = {}
    embeddings: dict[str, torch.Tensor] = {}
    images_of: dict[str, int] = {}
    counts: dict[str, dict[str, int]] = {}
    for k, concept in enumerate(concepts):
        hits = n = 0
        total = None
        fired: dict[str, int] = {}
        for batch in jobs(concept, cfg):
            images = model.generate(
                [p for p, _, _ in batch], [s for _, s, _ in batch], steps=cfg.steps, guidance_scale=batch[0][2]
            )
            if concept.name not in samples:
                samples[concept.name] = images[0]
            found = detector.detect(images, classes)
            hits += int(found.shows[:, k].sum())
            n += images.shape[0]
            for cls, count in found.counts.items():
                fired[cls] = fired.get(cls, 0) + count
            vectors = detector.embed(images) if embed else None
            if vectors is not None:
                summed = vectors.sum(0).cpu()
                total = summed if total is None else total + summed
        presence[concept.name] = hits / n
        images_of[concept.name] = n
        if fired:
            counts[concept.name] = fired
        if total is not None:
            embeddings[concept.name] = total / n
    return Evaluation(presence, samples, embeddings, images_of, counts)


@torch.no_grad()
def mean_embedding(detector: Detector, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor | None:
    """Mean detector embedding (D,) of images (N, 3, H, W) in [-1, 1] (a dataset's pixels); None from a
    detector without embeddings."""
    total = None
    for start in range(0, pixels.shape[0], batch_size):
        vectors = detector.embed((pixels[start : start + batch_size] + 1) / 2)
        if vectors is None:
            return None
        summed = vectors.sum(0).cpu()
        total = summed if total is None else total + summed
    return total / pixels.shape[0]


def closeness(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine between two mean embeddings: how close a fine-tuning set is to a concept (docs/background.md §4)."""
    return float(F.cosine_similarity(a.float(), b.float(), dim=0))


def data_closeness(detector: Detector, pixel_sets: list[torch.Tensor], concept: torch.Tensor | None) -> float:
    """Closeness of all the images of several datasets ((N_i, 3, H, W) in [-1, 1]) to a concept's mean embedding
    (nan when the detector has no embeddings)."""
    mean = mean_embedding(detector, torch.cat(pixel_sets)) if concept is not None else None
    return closeness(mean, concept) if mean is not None else float("nan")


# -- persistence (the erase cache stores the erased model's evaluation next to its weights) ------------
def save_evaluation(ev: Evaluation, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(
        json.dumps({"presence": ev.presence, "images": ev.images, "counts": ev.counts})
    )
    tensors = {f"sample.{k}": v.contiguous() for k, v in ev.samples.items()}
    tensors |= {f"embedding.{k}": v.contiguous() for k, v in ev.embeddings.items()}
    save_file(tensors, str(folder / "evaluation.safetensors"))


def load_evaluation(folder: Path) -> Evaluation:
    from safetensors.torch import load_file

    saved = json.loads((folder / "evaluation.json").read_text())
    tensors = load_file(str(folder / "evaluation.safetensors"))
    pick = lambda prefix: {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    return Evaluation(
        saved["presence"], pick("sample."), pick("embedding."), saved.get("images", {}), saved.get("counts", {})
    )
