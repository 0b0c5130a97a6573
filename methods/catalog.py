"""Every registry of the project in one place: methods (erasers), models, datasets, detectors.

A new component is one file with a typed config and one entry function, plus one line here (methods) or
a `register` decorator in its file (models, datasets, detectors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from methods import esd, toyworld  # noqa: F401  (toyworld registers its dataset and detector)
from methods.datasets import DATASETS
from methods.evaluate import DETECTORS
from methods.models import MODELS
from methods.registry import Registry

# An eraser: erase(model, prompts, cfg, *, seed, log) -> result with `.trained` (names of changed params).
METHODS: Registry[Callable[..., Any]] = Registry("method")
METHODS.register(
    "esd", config=esd.ESDConfig, description="ESD (Gandikota 2023): negative-guidance fine-tuning, ESD-x / ESD-u"
)(esd.erase)

REGISTRIES: dict[str, Registry[Any]] = {
    "methods": METHODS,
    "models": MODELS,
    "datasets": DATASETS,
    "detectors": DETECTORS,
}
