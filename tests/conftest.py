"""Shared fixtures: tiny seeded models built in code, and isolated environments for Ray and MLflow."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest
import torch

from methods.erasers.base import Concept, EraseRequest
from methods.models import DiffusionModel, load_model

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def _tiny_sd() -> DiffusionModel:
    return load_model("tiny-sd", {"seed": 0})


@pytest.fixture(scope="session")
def _tiny_sdxl() -> DiffusionModel:
    return load_model("tiny-sdxl", {"seed": 0})


@pytest.fixture
def tiny_sd(_tiny_sd: DiffusionModel) -> DiffusionModel:
    """A fresh copy per test: tests may train it."""
    return copy.deepcopy(_tiny_sd)


@pytest.fixture
def tiny_sdxl(_tiny_sdxl: DiffusionModel) -> DiffusionModel:
    return copy.deepcopy(_tiny_sdxl)


@pytest.fixture
def isolated_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a CLI subprocess: its own HOME (Ray writes an auth token under ~/.ray) and a short
    RAY_TMPDIR (Ray's socket paths must stay under ~107 characters)."""
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env = {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "RAY_TMPDIR": ray_tmp,
        "RAY_AUTH_MODE": "disabled",
        "PYTHONPATH": str(REPO),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    (tmp_path / "home").mkdir()
    return env


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    after = module.state_dict()
    return {k for k, v in before.items() if not torch.equal(v, after[k])}


def request(*prompts: str, name: str = "circle", seed: int = 0, **kw) -> EraseRequest:
    """An erase request for one concept described by `prompts`."""
    return EraseRequest(targets=[Concept(name, list(prompts))], seed=seed, **kw)
