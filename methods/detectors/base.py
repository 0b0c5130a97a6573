"""What a detector is, the detectors' registry, and loading one by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from pydantic import BaseModel

from methods.registry import Registry


class Detector(Protocol):
    def classify(self, images: torch.Tensor, classes: list[str]) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B,) index into `classes` of the class each image shows."""
        ...

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) unit-norm image embeddings (data closeness covariate)."""
        ...


# A detector's config says whether the detector can decide that an image shows none of the classes it is
# asked about (`abstains: ClassVar[bool]`); one that cannot needs at least two classes, or presence is 1 by
# construction (orchestrator/spec.py refuses such a spec).
DETECTORS: Registry[Callable[[Any, torch.device], Detector]] = Registry("detector")


def load_detector(name: str, options: BaseModel | dict[str, Any] | None, device: torch.device) -> Detector:
    """A registered detector; `options` is its typed config (as the spec validated it) or a mapping for it."""
    entry = DETECTORS.get(name)
    cfg = (
        options
        if isinstance(options, BaseModel) or entry.config is None
        else entry.config.model_validate(options or {})
    )
    return entry.obj(cfg, device)
