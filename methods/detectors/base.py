"""What a detector is, the detectors' registry, and loading one by name.

A detector decides, for each image and each concept name it is asked about, whether the image shows the
concept (`detect`). It must be able to say no: a detector that only picks one of the names it is given
(a zero-shot argmax) cannot, and then needs other names to pick (others, neutral or extra classes) or
presence is 1 by construction; its config says so (`can_say_none`) and orchestrator/spec.py refuses a spec
where presence cannot vary. Every detector config also describes itself (`record`): the evaluator's name,
package version, weights hash and settings, which every trial logs, so runs measured differently are not
compared unknowingly.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

import torch
from pydantic import BaseModel

from methods.registry import Registry


@dataclass(frozen=True)
class Detection:
    shows: torch.Tensor  # (B, K) bool: image b shows concept k (of the names asked about)
    counts: dict[str, int] = field(default_factory=dict)  # images in which each of the detector's own classes
    # fired (NudeNet's exposed parts, say): logged beside presence


class Detector(Protocol):
    def detect(self, images: torch.Tensor, concepts: list[str]) -> Detection:
        """(B, 3, H, W) in [0, 1] -> which of `concepts` each image shows."""
        ...

    def embed(self, images: torch.Tensor) -> torch.Tensor | None:
        """(B, 3, H, W) in [0, 1] -> (B, D) unit-norm image embeddings (the data-closeness covariate), or
        None from a detector that has none (NudeNet)."""
        ...


class DetectorConfig(Protocol):
    def can_say_none(self) -> bool:
        """Whether the detector can decide that an image shows none of the concepts it is asked about."""
        ...

    def record(self) -> dict[str, Any]:
        """The evaluator's identity and settings (flat, MLflow-param-sized values)."""
        ...


def one_hot(index: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) class indices, -1 for none -> (B, k) bool."""
    shows = torch.zeros(index.shape[0], k, dtype=torch.bool)
    hit = index >= 0
    shows[hit.nonzero().flatten(), index[hit]] = True
    return shows


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """A weights file's SHA-256 (memoised by path, size and modification time: one read per process)."""
    st = os.stat(path)
    return _sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)


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
