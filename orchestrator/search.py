"""The search: an experiment spec becomes a Ray Tune `Tuner` driven by Optuna's seeded TPE sampler.

The search space maps dotted spec paths to Tune domains; `OptunaSearch` turns them into Optuna
distributions. ASHA, when configured, stops unpromising fine-tunes early on the metric's curve over
`ft_step` (the fine-tuning step), so a trial's budget is its number of fine-tuning steps.
"""

from __future__ import annotations

import os
from typing import Any

from orchestrator.spec import Dimension, ExperimentSpec, max_finetune_steps


def tune_domain(dim: Dimension) -> Any:
    from ray import tune

    if dim.loguniform is not None:
        return tune.loguniform(*dim.loguniform)
    if dim.uniform is not None:
        return tune.uniform(*dim.uniform)
    if dim.randint is not None:
        low, high = dim.randint
        return tune.randint(low, high + 1)  # Tune's upper bound is exclusive; ours is inclusive
    return tune.choice(list(dim.choice or []))


def build_tuner(
    spec: ExperimentSpec, spec_data: dict[str, Any], *, run_name: str, storage_path: str, callbacks: list[Any]
) -> Any:
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from orchestrator.trial import tune_trainable

    s = spec.search
    space = {path: tune_domain(dim) for path, dim in s.space.items()}
    searcher = None
    if space:  # Optuna has nothing to propose without a space; Tune then repeats the fixed trial
        searcher = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=s.seed))
    scheduler = None
    if s.scheduler is not None:
        scheduler = ASHAScheduler(
            time_attr="ft_step",
            max_t=max_finetune_steps(spec),
            grace_period=s.scheduler.grace_period or spec.finetune.eval_every,
            reduction_factor=s.scheduler.reduction_factor,
        )
    trainable = tune.with_resources(
        tune.with_parameters(tune_trainable, spec_data=spec_data),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=s.metric,
            mode=s.mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=s.num_samples,
            max_concurrent_trials=s.max_concurrent_trials,
            reuse_actors=True,  # warm workers keep torch, the base model and the detector loaded
        ),
        run_config=tune.RunConfig(
            name=run_name,
            storage_path=os.path.abspath(storage_path),
            callbacks=callbacks,
            verbose=1,
        ),
    )
