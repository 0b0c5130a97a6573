"""Every registry of the project in one place: methods (erasers), models, datasets, detectors.

A new component is one file with a typed config, one entry function and a `register` call, plus its
import here.
"""

from __future__ import annotations

from typing import Any

# Importing a component's file registers it.
from methods import toyworld  # noqa: F401
from methods.datasets import generated, imagefolder, parquet  # noqa: F401
from methods.datasets.base import DATASETS
from methods.detectors import clip, imagenet, nudenet  # noqa: F401
from methods.detectors.base import DETECTORS
from methods.erasers import esd, fewshot, mace, meta, none, uce  # noqa: F401
from methods.erasers.base import METHODS
from methods.models import MODELS
from methods.registry import Registry

REGISTRIES: dict[str, Registry[Any]] = {
    "methods": METHODS,
    "models": MODELS,
    "datasets": DATASETS,
    "detectors": DETECTORS,
}
