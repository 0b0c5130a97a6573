"""`none`: no erasure. Control trials: fine-tuning the base model itself, so that a trial's resurgence can
be compared with what the same fine-tuning does to a model that never forgot the concept."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from methods.erasers.base import METHODS, EraseRequest, EraseResult, Method
from methods.models import DiffusionModel


class NoneConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def erase(model: DiffusionModel, request: EraseRequest, cfg: NoneConfig) -> EraseResult:
    """Leave the model as it is."""
    return EraseResult(trained=[])


METHODS.register("none", config=NoneConfig, description="no erasure (control trials)")(Method(erase=erase))
