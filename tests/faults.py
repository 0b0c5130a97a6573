"""Faults a test causes inside the trials of a command it starts (tests/inject.py puts `add_fault` into each of
its processes): $TEST_FAULT is JSON such as {"raise_at": 10} (raise an error) or {"kill_at": 10} (SIGKILL the
worker process) when a trial reaches that fine-tuning step, once per trial (a marker file in the folder
"markers" remembers it), optionally only for trials whose folder name contains "only" (Tune names it
tune_trainable_<id>_<index>_<values>...: "_1_" is the first trial)."""

from __future__ import annotations

import functools
import json
import os
import signal
from pathlib import Path
from types import ModuleType
from typing import Any


def add_fault(trial_module: ModuleType) -> None:
    """Called with orchestrator.trial when a process imports it: the fault becomes one of its step hooks."""
    trial_module.STEP_HOOKS.append(functools.partial(fault, json.loads(os.environ["TEST_FAULT"])))


def fault(plan: dict[str, Any], step: int, trial_dir: Path) -> None:
    # Markers live in plan["markers"] (a folder that outlives the worker: Tune may give a restarted trial a
    # fresh local folder), one per trial folder name.
    marker = Path(plan.get("markers", trial_dir)) / f"{trial_dir.name}.fault-injected"
    if marker.exists() or plan.get("only", "") not in trial_dir.name:
        return
    if step == plan.get("raise_at"):
        marker.write_text("raise")
        raise RuntimeError(f"injected fault at ft_step {step}")
    if step == plan.get("kill_at"):
        marker.write_text("kill")
        os.kill(os.getpid(), signal.SIGKILL)


def fault_env(env: dict[str, str], tmp_path: Path, **plan: Any) -> dict[str, str]:
    """`env` for a command whose trials meet the fault `plan` (markers in tmp_path)."""
    from tests.inject import inject

    plan = {"markers": str(tmp_path), **plan}
    after = {"orchestrator.trial": "tests.faults:add_fault"}
    return inject(env, tmp_path / "site", after, TEST_FAULT=json.dumps(plan))
