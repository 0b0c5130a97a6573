"""One trial: erase -> evaluate -> fine-tune, evaluating every `eval_every` steps, as a chain of stages.

`execute_trial` is plain Python (the benchmark calls it in a loop); `tune_trainable` is the same trial as
a Ray Tune function trainable. Reports carry `ft_step` (the monotonic step ASHA uses), `presence`,
`resurgence` (= presence - presence right after erasure), `retention`, and once-per-trial constants
(`presence_base`, `presence_erased`, ...).

Workers are warm: a worker process keeps the base model, its evaluation and the detector across the
trials it runs (Tune's `reuse_actors`), and every trial works on its own copy of the base model.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from methods.catalog import DATASETS, METHODS
from methods.datasets import DataContext
from methods.erasing import EraseRequest
from methods.evaluate import (
    Concept,
    Detector,
    Evaluation,
    data_closeness,
    evaluate,
    load_detector,
    save_grid,
)
from methods.finetune import finetune
from methods.models import DiffusionModel, load_model, weight_distance
from orchestrator.spec import ExperimentSpec, check_components, trial_spec

Report = Callable[[dict[str, Any]], None]

# Reported every evaluation, as metric histories over `ft_step`; and once per trial.
# Covariates (RESEARCH.md section 4): erase_distance = ||theta_erased - theta_base||, ft_distance =
# ||theta_now - theta_erased|| (effective weights, so LoRA counts), data_closeness = cosine between the mean
# detector embedding of the fine-tuning images and of the base model's images of the erased concept.
CURVE_METRICS = ("presence", "resurgence", "retention", "ft_loss", "ft_distance")
ONCE_METRICS = (
    "presence_base",
    "presence_erased",
    "retention_base",
    "retention_erased",
    "erase_seconds",
    "erase_cached",
    "erase_distance",
    "data_closeness",
)


@dataclass
class Erased:
    model: DiffusionModel  # never fine-tuned, only copied
    seconds: float  # what the erasure cost when it ran
    evaluation: Evaluation
    distance: float  # ||theta_erased - theta_base||


@dataclass
class Warm:
    model: DiffusionModel  # pristine base model: never trained, only copied
    detector: Detector
    base: Evaluation  # evaluation of the base model
    erased: dict[str, Erased] = field(default_factory=dict)  # the last erasure this worker ran, by its key


_WARM: dict[str, Warm] = {}  # per worker process, keyed by what determines it


def _concepts(spec: ExperimentSpec) -> list[Concept]:
    return [Concept(c.name, list(c.prompts)) for c in (spec.concept, *spec.others)]


def model_key(spec: ExperimentSpec) -> str:
    """A stable identity of the base model (cache keys of generated data)."""
    return json.dumps(spec.model.model_dump(), sort_keys=True)


def warm_state(spec: ExperimentSpec, configs: dict[str, Any]) -> Warm:
    key = json.dumps(
        [spec.model.model_dump(), spec.evaluate.model_dump(), [c.model_dump() for c in (spec.concept, *spec.others)]],
        sort_keys=True,
    )
    if key not in _WARM:
        _WARM.clear()  # one experiment per worker at a time; don't hold several models
        model = load_model(spec.model.name, spec.model.config, device=spec.model.device, dtype=spec.model.dtype)
        detector = load_detector(spec.evaluate.detector.name, spec.evaluate.detector.config, model.device)
        base = evaluate(model, detector, _concepts(spec), configs["evaluate"], embed=True)  # embed: data closeness
        _WARM[key] = Warm(model, detector, base)
    return _WARM[key]


def execute_trial(spec: ExperimentSpec, report: Report, artifact_dir: Path) -> dict[str, Any]:
    """Run one trial and return its last report."""
    configs = check_components(spec)
    warm = warm_state(spec, configs)
    concepts = _concepts(spec)
    erased_name = spec.concept.name

    # Stages 1 and 2: erase a copy of the base model and evaluate it; a worker keeps its last erasure, so
    # trials that differ only in fine-tuning erase once per worker.
    erase_key = json.dumps([spec.erase.model_dump(), spec.seed, spec.concept.model_dump()], sort_keys=True)
    cached = erase_key in warm.erased
    if not cached:
        warm.erased.clear()  # bounded: one erased model per worker
        erased_model = copy.deepcopy(warm.model)
        request = EraseRequest(
            targets=concepts[:1],
            preserve=concepts[1:],
            seed=spec.seed,
            data=DataContext(
                resolution=warm.model.resolution,
                cache_dir=Path(spec.cache_dir),
                model=warm.model,
                model_key=model_key(spec),
            ),
        )
        start = time.perf_counter()
        METHODS.get(spec.erase.method).obj.erase(erased_model, request, configs["erase"])
        seconds = time.perf_counter() - start
        evaluation = evaluate(erased_model, warm.detector, concepts, configs["evaluate"])
        warm.erased[erase_key] = Erased(erased_model, seconds, evaluation, weight_distance(erased_model, warm.model))
    model = copy.deepcopy(warm.erased[erase_key].model)
    erased = warm.erased[erase_key].evaluation
    erase_seconds = warm.erased[erase_key].seconds
    once = {
        "presence_base": warm.base.presence[erased_name],
        "presence_erased": erased.presence[erased_name],
        "retention_base": warm.base.retention(erased_name),
        "retention_erased": erased.retention(erased_name),
        "erase_seconds": erase_seconds,
        "erase_cached": float(cached),
        "erase_distance": warm.erased[erase_key].distance,
    }
    grid = artifact_dir / "samples.png"
    names = [c.name for c in concepts]

    def metrics(step: int, ev: Evaluation, loss: float) -> dict[str, Any]:
        p = ev.presence[erased_name]
        return {
            "ft_step": step,
            "presence": p,
            "resurgence": p - once["presence_erased"],
            "retention": ev.retention(erased_name),
            "ft_loss": loss,
            "ft_distance": weight_distance(model, warm.erased[erase_key].model),
            **once,
            "samples_png": str(grid),
        }

    rows = [("base", [warm.base.samples[n] for n in names]), ("erased", [erased.samples[n] for n in names])]
    save_grid(rows, names, grid)

    # Stage 3: fine-tune, round after round, evaluating every eval_every steps (step 0 is the erased model).
    ctx = DataContext(
        resolution=model.resolution,
        cache_dir=Path(spec.cache_dir),
        model=warm.model,
        model_key=model_key(spec),
        concept_prompts=list(spec.concept.prompts),
    )
    data = {
        choice: DATASETS.get(ds.name).obj(configs["datasets"][choice], ctx)
        for choice, ds in dict(spec.finetune.round_datasets()).items()
    }
    pixel_sets = [d.pixels for d in data.values()]
    once["data_closeness"] = data_closeness(warm.detector, pixel_sets, warm.base.embeddings[erased_name])
    last = metrics(0, erased, float("nan"))
    report(last)
    offset = 0  # fine-tuning steps of the earlier rounds: ft_step keeps growing across rounds

    def on_eval(step: int, loss: float) -> None:
        nonlocal last
        ev = evaluate(model, warm.detector, concepts, configs["evaluate"])
        save_grid([*rows, (f"ft {offset + step}", [ev.samples[n] for n in names])], names, grid)
        last = metrics(offset + step, ev, loss)
        report(last)

    ft_cfg = configs["finetune"]
    for r, (choice, _) in enumerate(spec.finetune.round_datasets()):
        round_cfg = ft_cfg.model_copy(update={"seed": ft_cfg.seed + r})  # a fresh data order per round
        finetune(model, data[choice], round_cfg, every=spec.finetune.eval_every, callback=on_eval)
        offset += ft_cfg.steps
    return last


def tune_trainable(config: dict[str, Any], spec_data: dict[str, Any]) -> None:
    """Ray Tune function trainable: `config` holds this trial's sampled values by dotted spec path."""
    from ray import tune

    spec = trial_spec(spec_data, config)
    execute_trial(spec, tune.report, Path(tune.get_context().get_trial_dir()))
