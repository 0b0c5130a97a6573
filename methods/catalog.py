"""Every registry of the project in one place: methods (erasers), models, datasets, detectors.

A new component is one file with a typed config, one entry function and a `register` call, plus its
import here.
"""

from __future__ import annotations

from typing import Any

# Importing a component's file registers it.
from methods import esd, fewshot, mace, meta, none, toyworld, uce  # noqa: F401
from methods.datasets import DATASETS
from methods.erasing import METHODS
from methods.evaluate import DETECTORS
from methods.models import MODELS
from methods.registry import Registry

REGISTRIES: dict[str, Registry[Any]] = {
    "methods": METHODS,
    "models": MODELS,
    "datasets": DATASETS,
    "detectors": DETECTORS,
}
