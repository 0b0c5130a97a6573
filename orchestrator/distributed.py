"""Distributed trials: a trial whose fine-tune runs on several workers through DeepSpeed, as a Ray Train job.

The Tune trial's own process starts the job (a `TorchTrainer` of `distributed.workers` workers, each with
the spec's `resources`, packed on one node) and waits for it; rank 0's reports reach Tune through Ray
Train's `TuneReportCallback`, so Tune, ASHA, the searcher and MLflow see a distributed trial exactly as a
single-process one. Every worker runs the same trial (`execute_trial` with its rank): the erasure and the
evaluations come from the erase cache or rank 0, every rank trains its share of each batch through a
DeepSpeed engine (ZeRO stage, offload and precision from the config file).

Ports: Ray Train sets up each job's process group (gloo on CPUs, NCCL on GPUs) on a free port of the node
it runs on, and DeepSpeed joins that group instead of opening its own, so several distributed trials on one
node do not collide. Faults: a dead worker makes Ray Train restart the worker group from the job's last
checkpoint (`failure.max_failures`, `failure.checkpoint_every`); the job is named after the Tune trial, so
a trial that Tune itself retries picks up the same job's checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from orchestrator.paths import is_remote
from orchestrator.resolved import ResolvedTrial
from orchestrator.trial import execute_trial, resume_checkpoint, worker_cache


def distributed_trial(trial: ResolvedTrial, config: dict[str, Any], lease_actor: str | None) -> None:
    """Run one distributed trial from inside its Tune trial (blocks until the job ends)."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    spec, d = trial.spec, trial.spec.distributed
    assert d is not None
    use_gpu = spec.resources.gpu > 0
    backend = d.backend if d.backend != "auto" else ("nccl" if use_gpu else "gloo")
    per_worker = {"CPU": spec.resources.cpu} | ({"GPU": spec.resources.gpu} if use_gpu else {})
    ctx = tune.get_context()
    storage = spec.storage_path if is_remote(spec.storage_path) else os.path.abspath(spec.storage_path)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "trial": trial,
            "lease_actor": lease_actor,
            "trial_dir": ctx.get_trial_dir(),
        },
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=d.workers, use_gpu=use_gpu, resources_per_worker=per_worker, placement_strategy="STRICT_PACK"
        ),
        run_config=RunConfig(
            name=f"train-{ctx.get_experiment_name()}-{ctx.get_trial_id()}",
            storage_path=storage,
            callbacks=[TuneReportCallback()],
            failure_config=FailureConfig(max_failures=spec.failure.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
        # A continued sweep's trial that a dead driver had started goes on from that run's checkpoint.
        resume_from_checkpoint=resume_checkpoint(config),
    )
    trainer.fit()


def train_worker(cfg: dict[str, Any]) -> None:
    """One rank of a distributed trial (a Ray Train worker)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPUs (gloo, no compiled ops)
    import deepspeed
    import ray.train
    import torch.distributed as td

    from methods.finetune import Distributed

    ctx = ray.train.get_context()
    deepspeed.init_distributed(dist_backend=td.get_backend())  # joins the group Ray Train set up
    trial: ResolvedTrial = cfg["trial"]
    assert trial.components.deepspeed is not None
    dist = Distributed(trial.components.deepspeed, ctx.get_world_rank(), ctx.get_world_size())

    def report(metrics: dict[str, Any], folder: Path | None = None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)

    cache = worker_cache(trial, cfg["lease_actor"])
    artifacts = Path(cfg["trial_dir"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        execute_trial(trial, report, artifacts, cache, distributed=dist)
        return
    with checkpoint.as_directory() as folder:
        execute_trial(trial, report, artifacts, cache, resume=Path(folder), distributed=dist)
