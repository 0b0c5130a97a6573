"""What every eraser shares: the request it answers, its result, the method registry, and the optimisation
loop of the optimisation-based methods (so that meta-unlearning can wrap their losses).

An eraser is registered as a `Method`: `erase(model, request, cfg) -> EraseResult` changes `model` in place.
Optimisation-based methods (ESD, few-shot) also expose `objective(model, request, cfg) -> Objective`: the
parameters they train, their optimizer and their loss at a step. `erase` is then `run_objective` over it,
and meta-unlearning adds its meta term to the same loss. Closed-form methods (UCE, MACE) have no objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from methods.datasets.base import CaptionedImages, DataContext, to_pixels
from methods.datasets.generated import GeneratedConfig, generated
from methods.models import DiffusionModel
from methods.registry import Registry


@dataclass(frozen=True)
class Concept:
    name: str  # the concept's name (a detector's class name; the word a method looks for in prompts)
    prompts: list[str]  # prompts that draw it


@dataclass(frozen=True)
class EraseRequest:
    targets: list[Concept]  # concepts to erase (MACE erases many at once; the others use every prompt)
    preserve: list[Concept] = field(default_factory=list)  # concepts to keep (the experiment's others)
    seed: int = 0
    data: DataContext | None = None  # cache and base model, for methods that draw images of a concept
    log: Callable[[int, float], None] | None = None  # (step, loss) of optimisation-based methods

    @property
    def prompts(self) -> list[str]:
        return [p for c in self.targets for p in c.prompts]


@dataclass(frozen=True)
class EraseResult:
    trained: list[str]  # names (model.named_parameters()) of the parameters the method changed
    losses: list[float] = field(default_factory=list)  # one per optimizer step (empty for closed forms)


class Objective(Protocol):
    params: dict[str, torch.nn.Parameter]  # what the method trains, by model.named_parameters() name

    def optimizer(self) -> torch.optim.Optimizer: ...

    def loss(self, step: int) -> torch.Tensor:
        """The method's loss at optimizer step `step` (graph attached to `params`)."""
        ...

    def close(self) -> None:
        """Free what the objective holds (frozen copies) and switch gradients off."""
        ...


@dataclass(frozen=True)
class Method:
    erase: Callable[[DiffusionModel, EraseRequest, Any], EraseResult]
    objective: Callable[[DiffusionModel, EraseRequest, Any], Objective] | None = None  # optimisation-based


METHODS: Registry[Method] = Registry("method")


def run_objective(obj: Objective, steps: int, log: Callable[[int, float], None] | None = None) -> EraseResult:
    """Minimise an objective for `steps` optimizer steps (the plain, non-meta training loop)."""
    optimizer = obj.optimizer()
    losses: list[float] = []
    try:
        for step in range(steps):
            loss = obj.loss(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if log is not None:
                log(step, losses[-1])
    finally:
        obj.close()
    return EraseResult(trained=sorted(obj.params), losses=losses)


def concept_images(
    request: EraseRequest,
    prompts: list[str],
    *,
    images_per_prompt: int,
    seed: int,
    steps: int = 25,
    guidance_scale: float = 7.5,
) -> CaptionedImages:
    """Images the *base* model draws from `prompts`, cached under the request's data context (the way
    the source papers make their concept and preservation sets)."""
    if request.data is None or request.data.model is None:
        raise ValueError("this method draws images of the concept and needs a data context with the base model")
    cfg = GeneratedConfig(
        prompts=prompts, images_per_prompt=images_per_prompt, steps=steps, guidance_scale=guidance_scale, seed=seed
    )
    return generated(cfg, request.data)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class ImageSource(Protocol):
    """The fields of a method's config that say where its images of a concept come from."""

    images: int  # how many
    image_folder: str | None  # <folder>/<concept name>/ holds them; None: the base model draws them
    image_steps: int  # DDIM steps per drawn image
    image_guidance: float  # and its guidance scale


def concept_pixels(
    request: EraseRequest, concept: Concept, source: ImageSource, resolution: int
) -> tuple[torch.Tensor, list[str]]:
    """Up to `source.images` images of `concept` as (N, 3, R, R) in [-1, 1], and a name per image (file stems):
    from `<image_folder>/<concept name>/` when a folder is given, else drawn by the base model (cached)."""
    images, folder = source.images, source.image_folder
    if folder is not None:
        where = Path(folder).expanduser() / concept.name
        files = sorted(f for f in where.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if where.is_dir() else []
        files = files[:images]
        if not files:
            raise ValueError(f"{where}: no images of {concept.name!r}")
        return to_pixels([Image.open(f) for f in files], resolution), [f.stem for f in files]
    data = concept_images(
        request,
        concept.prompts,
        images_per_prompt=max(1, math.ceil(images / len(concept.prompts))),
        seed=request.seed,
        steps=source.image_steps,
        guidance_scale=source.image_guidance,
    )
    return data.pixels[:images], [f"{concept.name}_{i}" for i in range(min(images, len(data)))]
