"""The Ray Tune entry point of a trial: its config carries the trial's resolved settings (built by the searcher
on the driver, orchestrator/resolved.py), and the trial runs here (orchestrator/trial.py) or, for a distributed
fine-tune, as a Ray Train job (orchestrator/distributed.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.distributed import distributed_trial
from orchestrator.resolved import RESOLVED_KEY, ResolvedTrial
from orchestrator.trial import execute_trial, resume_checkpoint, worker_cache


def tune_trainable(config: dict[str, Any], lease_actor: str | None = None) -> None:
    """Ray Tune function trainable: `config` holds this trial's sampled values by dotted spec path, its slot
    and its `ResolvedTrial`. A distributed trial runs its fine-tune as a Ray Train job (`distributed_trial`)."""
    from ray import tune

    trial: ResolvedTrial = config[RESOLVED_KEY]
    if trial.spec.distributed is not None:
        distributed_trial(trial, config, lease_actor)
        return

    def report(metrics: dict[str, Any], folder: Path | None = None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(folder)) if folder is not None else None
        tune.report(metrics, checkpoint=checkpoint)

    trial_dir = Path(tune.get_context().get_trial_dir())
    checkpoint = tune.get_checkpoint() or resume_checkpoint(config)
    if checkpoint is None:
        execute_trial(trial, report, trial_dir, worker_cache(trial, lease_actor))
        return
    with checkpoint.as_directory() as folder:
        execute_trial(trial, report, trial_dir, worker_cache(trial, lease_actor), resume=Path(folder))
