"""A spy on the validating constructors, for a command a test starts (tests/inject.py puts `watch` into each
of its processes): every validation of one of the project's typed classes (a spec, a component config) is
appended to $TEST_SPY_LOG as a JSON line with the process and the project functions on the stack."""

from __future__ import annotations

import json
import os
import sys
from types import ModuleType
from typing import Any

PROJECT = ("orchestrator", "methods")


def watch(_: ModuleType) -> None:
    """Called when a process imports orchestrator.spec: wrap pydantic's model_validate (no class of the project
    overrides it; nested models are validated inside it without another call)."""
    import pydantic

    original = pydantic.BaseModel.model_validate.__func__  # type: ignore[attr-defined]
    log = os.environ["TEST_SPY_LOG"]

    def model_validate(cls: Any, obj: Any, *args: Any, **kwargs: Any) -> Any:
        if cls.__module__.split(".")[0] in PROJECT:
            callers, frame = [], sys._getframe(1)
            while frame is not None:
                if frame.f_globals.get("__name__", "").split(".")[0] in PROJECT:
                    callers.append(frame.f_code.co_name)
                frame = frame.f_back
            with open(log, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "cls": cls.__name__, "callers": callers}) + "\n")
        return original(cls, obj, *args, **kwargs)

    pydantic.BaseModel.model_validate = classmethod(model_validate)  # type: ignore[assignment]


def records(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f]
