"""One trial's resolved settings: the experiment with the trial's searched values applied, every component's
config typed, built once on the driver when the searcher fills the trial's slot (`resolve_trial`).

The same frozen object travels in the trial's Tune config (`RESOLVED_KEY`) to the worker that runs it, and is
what the trial (orchestrator/trial.py), the erase cache's keys, the MLflow params (orchestrator/callbacks.py)
and so the report read: no stage validates the spec again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from orchestrator.spec import (
    Components,
    Experiment,
    ExperimentSpec,
    apply_overrides,
    components,
    parse_experiment,
    validate_structure,
)

RESOLVED_KEY = "_resolved"  # the trial's ResolvedTrial in its Tune config


@dataclass(frozen=True, eq=False)
class ResolvedTrial:
    spec: ExperimentSpec  # the experiment with this trial's values applied
    components: Components  # and every component's typed config
    values: dict[str, Any] = field(default_factory=dict)  # the searched values, by dotted spec path
    slot: str = ""  # the sweep's name for the trial (orchestrator/ledger.py)

    def __str__(self) -> str:  # what Tune's JSON files and folder names show of it
        return f"resolved-{self.slot or 'trial'}"

    @cached_property
    def params(self) -> dict[str, Any]:
        """The trial's spec with every component config filled in with its defaults: what MLflow logs as
        params and what reproduces the trial."""
        c, out = self.components, self.spec.model_dump(mode="json", exclude={"search", "smoke", "defender"})
        out["model"]["config"] = _dump(c.model)
        out["erase"]["config"] = _dump(c.erase)
        for choice, typed in c.datasets.items():
            node = out["finetune"]["dataset"] if choice == "dataset" else out["finetune"]["datasets"][choice]
            node["config"] = _dump(typed)
        out["finetune"]["config"] = _dump(c.finetune)
        out["evaluate"]["detector"]["config"] = _dump(c.detector)
        out["evaluate"]["config"] = _dump(c.evaluate)
        if c.proxy is not None:
            out["evaluate"]["proxy"] = _dump(c.proxy)
        if c.utility is not None:
            out["evaluate"]["utility"] = _dump(c.utility)
        if c.deepspeed is not None:
            out["distributed"]["deepspeed"] = c.deepspeed  # the file's content, not only its name
        out["evaluator"] = self.evaluator
        return out

    @cached_property
    def evaluator(self) -> dict[str, Any]:
        """What measured the trial (orchestrator/report.py compares it across runs): the detector's name,
        package version, weights hash and decision rule, the images per concept and their sampling, the
        prompt sets' hashes, and the utility metrics' own records."""
        s, c = self.spec, self.components
        record = getattr(c.detector, "record", dict)  # every shipped detector config has one
        out: dict[str, Any] = {"detector": {"name": s.evaluate.detector.name, **record()}}
        ev = c.evaluate
        out["sampling"] = {
            "steps": ev.steps,
            "guidance_scale": ev.guidance_scale,
            "seed": ev.seed,
            "images_per_prompt": ev.images_per_prompt,
        }
        for concept in s.concepts:
            images = len(concept.prompt_set.prompts()) if concept.prompt_set else len(concept.prompts)
            entry: dict[str, Any] = {"images": images * ev.images_per_prompt}
            if concept.prompt_set is not None:
                entry["prompt_set"] = concept.prompt_set.record()
            out.setdefault("concepts", {})[concept.name] = entry
        if c.utility is not None:
            out["utility"] = c.utility.record()
        return out

    @property
    def model_key(self) -> str:
        """A stable identity of the base model (cache keys of generated data)."""
        return json.dumps(self.spec.model.model_dump(), sort_keys=True)

    def erase_content(self) -> dict[str, Any]:
        """What determines the erased model (the erase cache's address, with the code version)."""
        s = self.spec
        return {
            "model": s.model.model_dump(mode="json"),
            "method": s.erase.method,
            "config": _dump(self.components.erase),
            "files": _file_records(self.components.erase),  # a prompt file read by the method (MACE's prior)
            "seed": s.seed,
            "targets": [c.model_dump(mode="json") for c in s.targets],  # the whole set erased at once
            "preserve": [c.model_dump(mode="json") for c in s.others],
        }

    def base_content(self) -> dict[str, Any]:
        """What determines the base model's evaluation and the proxy's probe."""
        s = self.spec
        return {
            "model": s.model.model_dump(mode="json"),
            "evaluate": self.params["evaluate"],
            "concepts": [c.model_dump(mode="json") for c in s.concepts],
            "evaluator": self.evaluator,  # the prompt files' and weights' hashes: a changed file is a new base
        }


def _dump(config: Any) -> dict[str, Any]:
    return config.model_dump(mode="json") if config is not None else {}


def _file_records(config: Any) -> dict[str, Any]:
    """The records (SHA-256, rows kept) of the prompt files a method's config read, by field: a changed file
    is a new erasure even where the config's text is the same. A wrapped config's (meta) under its name."""
    from methods.evaluation.prompts import PromptSetConfig

    if config is None:
        return {}
    found = {k: v.record() for k in type(config).model_fields if isinstance(v := getattr(config, k), PromptSetConfig)}
    inner = getattr(config, "inner", None)
    if callable(inner):
        found.update({f"method_config.{k}": v for k, v in _file_records(inner()).items()})
    return found


def resolve_trial(experiment: Experiment, values: dict[str, Any], slot: str = "") -> ResolvedTrial:
    """The trial of `experiment` that `values` (sampled values by dotted spec path; keys starting with "_" are
    the sweep's bookkeeping) pick. Every value a search space can produce was validated when the experiment
    was parsed; this types the sections the values change and takes the rest from the experiment as it is."""
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    if not values:
        return ResolvedTrial(experiment.spec, experiment.components, {}, slot)
    spec = validate_structure(apply_overrides(experiment.data, values))
    return ResolvedTrial(spec, components(spec, like=experiment), values, slot)


def max_finetune_steps(experiment: Experiment) -> int:
    """The longest fine-tune a trial can run (steps x rounds): ASHA's max_t."""
    spec = experiment.spec
    dim = spec.search.space.get("finetune.config.steps")
    steps = int(max(dim.extremes())) if dim is not None else experiment.components.finetune.steps
    rounds = spec.search.space.get("finetune.rounds")
    return steps * (int(max(rounds.extremes())) if rounds is not None else spec.finetune.rounds)


def resolve(data: dict[str, Any], values: dict[str, Any] | None = None) -> ResolvedTrial:
    """A spec mapping parsed and one trial of it resolved (the benchmarks' and tests' way to run a trial
    without a sweep)."""
    return resolve_trial(parse_experiment(data, check_smoke=False), values or {})
