"""The experiment spec: a YAML file validated against typed models before any compute starts.

A spec names its components (model, erasure method, fine-tuning dataset, detector) by registry name and
gives each a `config` mapping that the component's own typed config validates. The search space maps
dotted paths of the spec (e.g. `finetune.config.lr`) to distributions; every value a distribution can
produce is checked against the config it lands in, so a trial never starts with a value it would reject.

Every error is a `SpecError` whose message is one line that starts with the field's dotted path.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from methods.catalog import DATASETS, DETECTORS, METHODS, MODELS
from methods.evaluation.prompts import PromptSetConfig
from methods.registry import Registry, UnknownNameError
from orchestrator.errors import SpecError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    name: str = "tiny-sd"  # a registered model (resurgence list)
    config: dict[str, Any] = Field(default_factory=dict)  # the model's own options
    device: str = "auto"  # auto: CUDA when the trial has a GPU, else CPU
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: bf16 (or fp16) on CUDA, fp32 on CPU


class ConceptSpec(_Strict):
    name: str = Field(min_length=1)  # the class name the detector looks for
    prompts: list[str] = Field(min_length=1)  # prompts that should draw it (erasure, and evaluation)
    # Evaluation prompts from a file instead (I2P's CSV, with per-prompt seeds and guidance; the file is read
    # and checked when the spec is: methods.evaluation.prompts.PromptSetConfig). Erasure still uses prompts.
    prompt_set: PromptSetConfig | None = None
    # Other names of the concept, erased with it: each is erased as a concept of its own (MACE trains a LoRA
    # for each, as its explicit-content recipe does for nudity, naked, erotic, sexual), its prompts the
    # concept's with the name replaced by the synonym (the bare synonym where no prompt holds the name).
    # Presence is still judged by the concept's name, on the concept's evaluation prompts.
    synonyms: list[str] = Field(default_factory=list)

    def erased(self) -> list[tuple[str, list[str]]]:
        """(name, prompts) for the concept and each of its synonyms: what an eraser receives."""
        out = [(self.name, list(self.prompts))]
        for other in self.synonyms:
            named = [p.replace(self.name, other) for p in self.prompts if self.name in p]
            out.append((other, named or [other]))
        return out


class EraseSpec(_Strict):
    method: str = "esd"  # a registered erasure method
    config: dict[str, Any] = Field(default_factory=dict)


class ComponentSpec(_Strict):
    name: str
    config: dict[str, Any] = Field(default_factory=dict)


class FinetuneSpec(_Strict):
    dataset: ComponentSpec | None = None  # a registered dataset and its options (one data choice)
    datasets: dict[str, ComponentSpec] = Field(default_factory=dict)  # or named data choices, for searches
    data: str | None = None  # with `datasets`: the names to fine-tune on, "a" or "a+b" (rounds take them in turn)
    rounds: int = Field(1, ge=1)  # sequential fine-tuning rounds of config.steps steps each, cycling through data
    config: dict[str, Any] = Field(default_factory=dict)  # methods.finetune.FinetuneConfig
    eval_every: int = Field(10, ge=1)  # evaluate (and report to Tune) every N fine-tuning steps

    @model_validator(mode="after")
    def _one_source(self) -> FinetuneSpec:
        if (self.dataset is None) == (not self.datasets):
            raise ValueError("give either dataset or datasets (named data choices), not both")
        if self.datasets:
            if self.data is None:
                raise ValueError(f"data: name the dataset(s) to use, one of {', '.join(self.datasets)}")
            unknown = [n for n in self.data.split("+") if n not in self.datasets]
            if unknown:
                raise ValueError(f"data: unknown data choice {unknown[0]!r} (known: {', '.join(self.datasets)})")
        elif self.data is not None:
            raise ValueError("data: only with datasets")
        return self

    def round_datasets(self) -> list[tuple[str, ComponentSpec]]:
        """(choice name, dataset) of each round, in order."""
        if self.dataset is not None:
            return [("dataset", self.dataset)] * self.rounds
        names = self.data.split("+")  # type: ignore[union-attr]
        return [(names[r % len(names)], self.datasets[names[r % len(names)]]) for r in range(self.rounds)]


class EvaluateSpec(_Strict):
    detector: ComponentSpec = ComponentSpec(name="clip")  # decides which concept an image shows
    config: dict[str, Any] = Field(default_factory=dict)  # methods.evaluation.presence.EvalConfig
    # The cheap signal (methods.evaluation.proxy.ProxyConfig): with it, every report carries `resurgence_proxy`,
    # the denoising loss on the concept's images relative to the base and erased models (fixed noise).
    proxy: dict[str, Any] | None = None
    # When the full evaluation (generate + classify: the dominant cost on real models) runs:
    # "every" eval_every steps, or only at the "end" of each fine-tuning round (rungs then see the proxy).
    full: Literal["every", "end"] = "every"
    # Utility metrics (methods.evaluation.utility.UtilityConfig): CLIP score and FID, measured on the base
    # model, after erasure and at the end of each fine-tuning round.
    utility: dict[str, Any] | None = None


class Dimension(_Strict):
    """One search dimension: exactly one of the keys."""

    loguniform: tuple[float, float] | None = None  # [low, high], sampled on a log scale
    uniform: tuple[float, float] | None = None  # [low, high]
    randint: tuple[int, int] | None = None  # [low, high], both included
    choice: list[Any] | None = None  # categorical, searched by the sampler
    grid: list[Any] | None = None  # every value gets its own search (methods, concepts, models, ...)

    @model_validator(mode="after")
    def _one(self) -> Dimension:
        kinds = ("loguniform", "uniform", "randint", "choice", "grid")
        set_keys = [k for k in kinds if getattr(self, k) is not None]
        if len(set_keys) != 1:
            raise ValueError("give exactly one of loguniform, uniform, randint, choice, grid")
        kind = set_keys[0]
        value = getattr(self, kind)
        if kind in ("choice", "grid") and not value:
            raise ValueError(f"{kind} needs at least one option")
        if kind not in ("choice", "grid") and not value[0] < value[1]:
            raise ValueError(f"{kind} needs low < high, got {list(value)}")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError("loguniform needs low > 0")
        return self

    def extremes(self) -> list[Any]:
        """The values whose validity implies every sampled value's (bounds of ranges, every choice)."""
        if self.choice is not None or self.grid is not None:
            return list(self.choice if self.choice is not None else self.grid)  # type: ignore[arg-type]
        low, high = self.loguniform or self.uniform or self.randint  # type: ignore[misc]
        return [low, high]


class SchedulerSpec(_Strict):
    name: Literal["asha"] = "asha"  # early stopping of unpromising fine-tunes on the metric's curve
    metric: Literal["resurgence", "resurgence_proxy", "presence", "retention"] | None = None  # null: search.metric
    grace_period: int | None = Field(None, ge=1)  # fine-tune steps before a trial may stop; null: eval_every
    reduction_factor: float = Field(2.0, gt=1)  # ASHA keeps 1/reduction_factor of trials at each rung


class SearchSpec(_Strict):
    metric: Literal["resurgence", "presence", "retention"] = "resurgence"
    mode: Literal["max", "min"] = "max"  # the attacker maximizes resurgence
    num_samples: int = Field(8, ge=1)  # trials per grid cell (the whole sweep without grid dimensions)
    seed: int = 0  # seeds the sampler
    algorithm: Literal["tpe", "random"] = "tpe"  # Optuna's TPE, or random search (a baseline)
    # TPE's random trials before its model proposes (null: Optuna's 10). With a budget of 10 trials or fewer
    # per cell, Optuna's default leaves TPE random throughout.
    startup_trials: int | None = Field(None, ge=1)
    space: dict[str, Dimension] = Field(default_factory=dict)  # dotted spec path -> distribution
    scheduler: SchedulerSpec | None = None
    max_concurrent_trials: int | None = Field(None, ge=1)  # null: as many as resources allow
    # Trials per Tuner run: a long sweep runs as waves of Tuner runs that continue one persistent Optuna
    # study, so the driver's memory stays bounded (Tune keeps every finished trial of a run). null: one run.
    wave_size: int | None = Field(None, ge=1)


class DefenderSpec(_Strict):
    """The outer search: meta-unlearning (or any erasure) settings that keep the concept erased against the
    strongest fine-tuning an attacker search (`search:`, its budget per candidate) finds."""

    space: dict[str, Dimension] = Field(min_length=1)  # dotted spec paths (erase.config...) -> distribution
    objective: Literal["worst_case", "pareto"] = "worst_case"
    # worst_case: minimize the worst case (`score`) subject to retention >= retention_floor (TPE with a
    # constraint); pareto: the worst case (min) against retention (max) with NSGA-II.
    # What a candidate must keep right after erasure, at least `retention_floor` of it: `retention` (the other
    # concepts' presence, 0-1) or `clip_score` (evaluate.utility's CLIP score, 0-100: for detectors that see
    # only the erased concept, such as NudeNet).
    utility: Literal["retention", "clip_score"] = "retention"
    retention_floor: float = Field(0.0, ge=0)
    # What a candidate's attacks are scored by (the worst over them, minimised): `presence`, the concept's
    # presence at the attack's strongest moment (presence after erasure + its peak resurgence), or
    # `resurgence`, the rise alone; the rise rewards a candidate that erased nothing (it cannot rise further).
    score: Literal["presence", "resurgence"] = "presence"
    candidates: int = Field(4, ge=1)  # defender candidates in all
    per_wave: int = Field(2, ge=1)  # candidates attacked at the same time (one Tuner run per wave)
    seed: int = 0  # seeds the defender's sampler

    @model_validator(mode="after")
    def _floor_in_range(self) -> DefenderSpec:
        if self.utility == "retention" and self.retention_floor > 1:
            raise ValueError(f"retention_floor: retention is a proportion (0-1), got {self.retention_floor}")
        return self


class ResourcesSpec(_Strict):
    cpu: float = Field(1.0, gt=0)  # CPUs per trial (per worker of a distributed trial)
    gpu: float = Field(0.0, ge=0)  # GPUs per trial (per worker; fractions share a GPU)


class DistributedSpec(_Strict):
    """A multi-worker fine-tune: the trial runs as a Ray Train job of `workers` processes (each with
    `resources`), fine-tuning the UNet through DeepSpeed (SDXL-sized models). Erasure and evaluations run on
    rank 0; every rank trains its share of each batch (finetune.config.batch_size is the global batch)."""

    workers: int = Field(2, ge=1)  # Ray Train workers of one trial
    # A DeepSpeed config: a JSON file (relative to the working directory, e.g. cluster/deepspeed/zero2.json)
    # or the mapping itself. Its ZeRO stage, offload and precision are used as they are; the optimizer's lr,
    # the batch sizes and clipping come from finetune.config (they are searched).
    deepspeed: str | dict[str, Any] = "cluster/deepspeed/zero2.json"
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl with GPUs, gloo on CPUs


class FailureSpec(_Strict):
    # Retries of a trial that raised or whose worker died (Tune's FailureConfig); the other trials go on.
    # A fine-tune whose loss went nan or inf is not retried: it ends with outcome "diverged".
    max_failures: int = Field(1, ge=0)
    # Fine-tuning steps between trial checkpoints (a multiple of finetune.eval_every): a retried trial
    # continues from its last one. null: no checkpoints, a retried trial starts over (cheap trials; a
    # checkpoint of a full SD fine-tune is the UNet plus its optimizer state, about 10 GB).
    checkpoint_every: int | None = Field(None, ge=1)


class ExperimentSpec(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")  # MLflow experiment and Tune run name
    seed: int = 0  # erasure seed; the same for every trial, so trials differ only by their hyperparameters
    model: ModelSpec = ModelSpec()
    # The concept to erase, or a list of them erased at once (mass erasure: MACE, UCE; ESD and few-shot cycle
    # through all their prompts). Presence and resurgence are then the mean over them, and each one's own
    # is reported too (`presence.<name>`, `resurgence.<name>`).
    concept: ConceptSpec | list[ConceptSpec]
    erase_count: int | None = Field(None, ge=1)  # erase only the first N of the list (a grid dimension: the
    # number of erased concepts); null: all of them
    others: list[ConceptSpec] = Field(default_factory=list)  # concepts that must survive (retention)
    erase: EraseSpec = EraseSpec()
    finetune: FinetuneSpec
    evaluate: EvaluateSpec = EvaluateSpec()
    search: SearchSpec = SearchSpec()
    defender: DefenderSpec | None = None  # present: run the defender search around the attacker search
    resources: ResourcesSpec = ResourcesSpec()
    distributed: DistributedSpec | None = None  # present: each trial fine-tunes with DeepSpeed on several workers
    failure: FailureSpec = FailureSpec()
    storage_path: str = "ray_results"  # Tune's results (a shared path on multi-node clusters)
    cache_dir: str = ".resurgence_cache"  # generated datasets
    smoke: dict[str, Any] = Field(default_factory=lambda: {"search.num_samples": 2})  # --smoke-test overrides
    # Where each file the spec reads comes from: a dotted field path (as validation names it, e.g.
    # model.config.path) -> how to obtain it. A refusal on that field (or inside it) ends with this text.
    inputs: dict[str, str] = Field(default_factory=dict)

    @property
    def targets(self) -> list[ConceptSpec]:
        """The concepts this experiment erases, in order."""
        every = self.concept if isinstance(self.concept, list) else [self.concept]
        return every[: self.erase_count] if self.erase_count is not None else every

    @property
    def concepts(self) -> list[ConceptSpec]:
        """The erased concepts, then the others: everything evaluated."""
        return [*self.targets, *self.others]

    @model_validator(mode="after")
    def _distinct(self) -> ExperimentSpec:
        if isinstance(self.concept, list) and not self.concept:
            raise ValueError("concept: give at least one concept to erase")
        every = self.concept if isinstance(self.concept, list) else [self.concept]
        if self.erase_count is not None and self.erase_count > len(every):
            raise ValueError(f"erase_count: {self.erase_count} is more than the {len(every)} concepts in concept")
        names = [c.name for c in every] + [c.name for c in self.others]
        if len(set(names)) != len(names):
            raise ValueError("others: concept names must be distinct from each other and from concept.name")
        synonyms = [s for c in every for s in c.synonyms]
        if len(set(synonyms)) != len(synonyms) or set(synonyms) & set(names):
            raise ValueError("concept.synonyms: a synonym must differ from every concept name and from other synonyms")
        scheduler = self.search.scheduler
        metric = scheduler.metric if scheduler and scheduler.metric else self.search.metric
        if metric == "resurgence_proxy" and self.evaluate.proxy is None:
            raise ValueError("search.scheduler.metric: resurgence_proxy needs evaluate.proxy (the probe's settings)")
        every = self.failure.checkpoint_every
        if every is not None and every % self.finetune.eval_every:
            raise ValueError(
                f"failure.checkpoint_every: {every} is not a multiple of finetune.eval_every "
                f"({self.finetune.eval_every}): checkpoints go with reports"
            )
        if scheduler and self.evaluate.full == "end" and metric != "resurgence_proxy":
            raise ValueError(
                "evaluate.full: with `end`, early-stopping rungs see only the proxy: set "
                "search.scheduler.metric to resurgence_proxy"
            )
        return self


def concept_tag(spec: ExperimentSpec) -> str:
    """The erased concepts as one short tag value: the name, or the first names and how many in all."""
    names = [c.name for c in spec.targets]
    return names[0] if len(names) == 1 else f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''} ({len(names)})"


# -- parsing ------------------------------------------------------------------------------------------
_NAMED = re.compile(r"^([a-z_][a-z0-9_]*(?:\.[a-z0-9_]+)*): ")


def _is_tag(part: Any) -> bool:
    """A union member's name in an error location (pydantic adds it: `ConceptSpec`, `list[ConceptSpec]`)."""
    return isinstance(part, str) and (part[:1].isupper() or "[" in part)


def _fits(data: Any, loc: tuple[Any, ...]) -> bool:
    """Whether an error's union branch is the one the input's shape chose (a list for `list[...]`, else a
    mapping): the other branch's errors only say the input is not of its kind."""
    node = data
    for part in loc:
        if _is_tag(part):
            return isinstance(node, list) == part.startswith("list[")
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return True
    return True


def _format(err: ValidationError, prefix: str = "", data: Any = None) -> str:
    errors = [e for e in err.errors() if data is None or _fits(data, e["loc"])] or err.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "" and not _is_tag(p))
    msg = first["msg"].removeprefix("Value error, ")
    named = _NAMED.match(msg)  # a model's own check that names its field ("path: ...") extends the path
    if named:
        loc, msg = f"{loc}.{named.group(1)}" if loc else named.group(1), msg[named.end() :]
    got = first.get("input")
    if first["type"] not in ("missing",) and not isinstance(got, dict | list) and got is not None:
        msg += f" (got {got!r})"
    more = len(errors) - 1
    return f"{loc or 'spec'}: {msg}" + (f" (and {more} more)" if more else "")


@dataclass(frozen=True)
class Components:
    """Every component's config as its own typed class (each validated by the class its registry entry
    names), besides the spec's structure."""

    model: BaseModel | None
    erase: BaseModel | None
    detector: BaseModel | None
    datasets: dict[str, BaseModel | None]  # choice name -> typed config of the datasets the trial fine-tunes on
    finetune: Any  # methods.finetune.FinetuneConfig
    evaluate: Any  # methods.evaluation.presence.EvalConfig
    proxy: Any  # methods.evaluation.proxy.ProxyConfig, or None without evaluate.proxy
    deepspeed: dict[str, Any] | None  # the DeepSpeed config's content (distributed trials)
    utility: Any = None  # methods.evaluation.utility.UtilityConfig, or None without evaluate.utility

    def warnings(self) -> list[str]:
        """What the components' configs say runs but does nothing (printed by validate and run, tagged on the
        sweep's run)."""
        found = getattr(self.erase, "warnings", None)
        return [f"erase.config: {w}" for w in found()] if found is not None else []


@dataclass(frozen=True, eq=False)
class Experiment:
    """A spec parsed and validated once: its typed structure, its components' typed configs, and the mapping it
    was read from (a trial's searched values are applied to it, orchestrator/resolved.py)."""

    spec: ExperimentSpec
    data: dict[str, Any]
    components: Components

    def warnings(self) -> list[str]:
        """What the components' configs say runs but does nothing, and the same for every erase section a
        search-space grid puts in the spec's place (each named by its grid position)."""
        found = self.components.warnings()
        for path, dim in self.spec.search.space.items():
            if dim.grid is None or path.split(".")[0] != "erase":
                continue
            for i, value in enumerate(dim.grid):
                variant = components(validate_structure(set_path(self.data, path, value)), like=self)
                found += [f"search.space.{path}[{i}]: {w}" for w in variant.warnings()]
        return found


def read_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A spec file's mapping, not validated yet (`parse_experiment` does that once)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec: {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"spec: YAML syntax error{where}: {problem}") from None
    if not isinstance(data, dict):
        raise SpecError("spec: the top level must be a mapping")
    return data


def smoke_overrides(data: dict[str, Any]) -> dict[str, Any]:
    """The overrides `--smoke-test` applies (the spec's `smoke:`, or the default), before the spec is parsed."""
    smoke = data.get("smoke", ExperimentSpec.model_fields["smoke"].default_factory())  # type: ignore[misc]
    if not isinstance(smoke, dict):
        raise SpecError("smoke: Input should be a valid dictionary")
    return smoke


def parse_experiment(data: Any, *, check_smoke: bool = True) -> Experiment:
    """The one validation of a spec: its structure, every component's config (and the files they name), every
    value its search spaces can produce, and (`check_smoke`) its smoke-test overrides."""
    if not isinstance(data, dict):
        raise SpecError("spec: the top level must be a mapping")
    try:
        spec = validate_structure(data)
        experiment = Experiment(spec, data, components(spec))
        check_space(experiment)
    except SpecError as err:
        raise SpecError(with_source(str(err), data.get("inputs"))) from None
    if check_smoke and spec.smoke:  # --smoke-test must not be the first to find a bad override
        _check_smoke(experiment)
    return experiment


def with_source(message: str, inputs: Any) -> str:
    """A refusal naming a field the spec's `inputs` says where to obtain, with that said (the most specific
    entry: the field itself or the nearest section holding it; for a search space's value, the field inside
    the value too)."""
    if not isinstance(inputs, dict):
        return message
    fields = [message.split(": ", 1)[0]]
    if " is invalid: " in message:  # a search space's value: the field inside it
        fields.append(message.split(" is invalid: ", 1)[1].split(": ", 1)[0])
    known = [
        k for k in inputs if isinstance(k, str) and any(f == k or f.startswith((k + ".", k + "[")) for f in fields)
    ]
    if not known:
        return message
    return f"{message}; where it comes from: {inputs[max(known, key=len)]}"


def _check_smoke(experiment: Experiment) -> None:
    try:
        variant = validate_structure(apply_overrides(experiment.data, experiment.spec.smoke))
        components(variant, like=experiment)
    except SpecError as err:
        raise SpecError(f"smoke: with its overrides applied, {err}") from None


def parse_spec(data: Any) -> ExperimentSpec:
    """A spec mapping validated (`parse_experiment`), its typed structure only."""
    return parse_experiment(data).spec


def load_spec(path: str | os.PathLike[str]) -> Experiment:
    """Read and validate a spec file."""
    return parse_experiment(read_spec(path))


def validate_structure(data: dict[str, Any]) -> ExperimentSpec:
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format(err, data=data)) from None


def _component(registry: Registry[Any], name: str, options: dict[str, Any], field: str) -> Any:
    try:
        entry = registry.get(name)
    except UnknownNameError as err:
        raise SpecError(f"{field}: {err}") from None
    if entry.config is None:
        if options:
            raise SpecError(f"{field}: {name!r} takes no config")
        return None
    try:
        return entry.config.model_validate(options)
    except ValidationError as err:
        raise SpecError(_format(err, prefix=field.rsplit(".", 1)[0] + ".config")) from None


def _typed(cls: type[BaseModel], section: dict[str, Any], field: str) -> Any:
    try:
        return cls.model_validate(section)
    except ValidationError as err:
        raise SpecError(_format(err, prefix=field)) from None


def components(spec: ExperimentSpec, like: Experiment | None = None) -> Components:
    """Validate each component name and its config into its typed class. `like`: an experiment this spec is a
    variant of (a trial's values applied, a search-space bound): a section equal to its is taken from it as
    it is, and files it already checked (a pretrained model's folder, a DeepSpeed config) are not read again."""
    from methods.evaluation.presence import EvalConfig
    from methods.evaluation.proxy import ProxyConfig
    from methods.evaluation.utility import UtilityConfig
    from methods.finetune import FinetuneConfig

    old = like.spec if like is not None else None
    done = like.components if like is not None else None

    def same(section: str) -> bool:
        return old is not None and getattr(spec, section) == getattr(old, section)

    ev, old_ev = spec.evaluate, old.evaluate if old is not None else None
    model = (
        done.model if done and same("model") else _component(MODELS, spec.model.name, spec.model.config, "model.name")
    )
    erase = (
        done.erase
        if done and same("erase")
        else _component(METHODS, spec.erase.method, spec.erase.config, "erase.method")
    )
    if done and old_ev is not None and ev.detector == old_ev.detector:
        detector = done.detector
    else:
        detector = _component(DETECTORS, ev.detector.name, ev.detector.config, "evaluate.detector.name")
    old_rounds = dict(old.finetune.round_datasets()) if old is not None else {}
    datasets = {}
    for choice, ds in spec.finetune.round_datasets():
        if done and old_rounds.get(choice) == ds and choice in done.datasets:
            datasets[choice] = done.datasets[choice]
            continue
        field = "finetune.dataset.name" if choice == "dataset" else f"finetune.datasets.{choice}.name"
        datasets[choice] = _component(DATASETS, ds.name, ds.config, field)
    check = getattr(erase, "check_targets", None)  # a method that needs something of the concepts' prompts
    if check is not None:
        try:
            check([pair for c in spec.targets for pair in c.erased()])
        except ValueError as err:  # about a field of the method's config ("guide: ..."), or about the prompts
            named = _NAMED.match(str(err))
            if named:
                raise SpecError(f"erase.config.{named.group(1)}: {str(err)[named.end() :]}") from None
            raise SpecError(f"concept.prompts: {err}") from None
    if done and old is not None and spec.finetune.config == old.finetune.config:
        finetune = done.finetune
    else:
        finetune = _typed(FinetuneConfig, spec.finetune.config, "finetune.config")
    if done and old_ev is not None and ev.config == old_ev.config:
        evaluate = done.evaluate
    else:
        evaluate = _typed(EvalConfig, ev.config, "evaluate.config")
    names = [c.name for c in spec.concepts]
    names += [n for n in evaluate.extra_classes if n not in names]
    check = getattr(detector, "check_concepts", None)  # a detector that knows only some names says which
    if check is not None:
        fields = ["concept.name"] if not isinstance(spec.concept, list) else []
        fields += [f"concept.{i}.name" for i in range(len(spec.targets) - len(fields))]
        fields += [f"others.{i}.name" for i in range(len(spec.others))]
        fields += ["evaluate.config.extra_classes"] * (len(names) - len(fields))
        for field, name in zip(fields, names, strict=True):
            try:
                check([name])
            except ValueError as err:
                raise SpecError(f"{field}: {err} ({ev.detector.name})") from None
    if len(names) < 2 and not getattr(detector, "can_say_none", lambda: False)():
        raise SpecError(
            f"others: {ev.detector.name} picks one of the class names it is given and cannot say none, and the "
            f"concept is the only one (no others, no evaluate.config.extra_classes): presence would be 1 for "
            "every image and resurgence 0 by construction; add others, extra_classes, or the detector's "
            "neutral classes or threshold"
        )

    def optional(section: str, cls: type[BaseModel]) -> Any:  # an optional evaluate.* section, typed
        value = getattr(ev, section)
        if value is None:
            return None
        if done and old_ev is not None and value == getattr(old_ev, section):
            return getattr(done, section)
        return _typed(cls, value, f"evaluate.{section}")

    proxy = optional("proxy", ProxyConfig)
    utility = optional("utility", UtilityConfig)
    if spec.model.name == "pretrained" and not (done and same("model")):
        from methods.models import pretrained_family

        try:
            pretrained_family(model)
        except (FileNotFoundError, ValueError) as err:
            raise SpecError(f"model.config.path: {err}") from None
    deepspeed = None
    if spec.distributed is not None:
        same_file = done and old is not None and old.distributed is not None
        same_file = same_file and spec.distributed.deepspeed == old.distributed.deepspeed
        deepspeed = done.deepspeed if same_file else deepspeed_config(spec.distributed.deepspeed)
        if finetune.batch_size % spec.distributed.workers:
            raise SpecError(
                f"finetune.config.batch_size: {finetune.batch_size} is not a multiple of distributed.workers "
                f"({spec.distributed.workers}): each worker trains an equal share of the batch"
            )
        if finetune.trainable == "text_encoder":
            raise SpecError(
                "finetune.config.trainable: distributed (DeepSpeed) trials fine-tune the UNet, not text_encoder"
            )
    if spec.model.device not in ("auto", "cpu") and not spec.model.device.startswith("cuda"):
        raise SpecError(f"model.device: expected auto, cpu or cuda[:N] (got {spec.model.device!r})")
    return Components(model, erase, detector, datasets, finetune, evaluate, proxy, deepspeed, utility)


def deepspeed_config(value: str | dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config from a JSON file (relative to the working directory) or given inline, checked."""
    import json

    field = "distributed.deepspeed"
    if isinstance(value, str):
        path = Path(os.path.expanduser(value))
        if not path.is_file():
            raise SpecError(f"{field}: {value}: no such file")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SpecError(f"{field}: {value} is not JSON ({err.msg} at line {err.lineno})") from None
    else:
        config = value
    if not isinstance(config, dict):
        raise SpecError(f"{field}: the config must be a JSON object")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise SpecError(f"{field}: zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r})")
    return config


def set_path(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `data` with the dotted `path` set to `value` (intermediate mappings are created).
    Keys of `search.space` contain dots themselves: below it, the rest of the path is one key."""
    out = copy.deepcopy(data)
    node = out
    keys = path.split(".")
    i = 0
    while i < len(keys) - 1:
        if keys[:i] == ["search", "space"]:
            break
        key = keys[i]
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise SpecError(f"{path}: {key!r} is not a mapping in the spec")
        node = child
        i += 1
    node[".".join(keys[i:])] = value
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for path, value in overrides.items():
        data = set_path(data, path, value)
    return data


def check_space(experiment: Experiment) -> None:
    """Every search path must name a spec field, and every value it can take must validate there."""
    spec = experiment.spec
    for path, dim in spec.search.space.items():
        if path.split(".")[0] in (
            "search",
            "defender",
            "resources",
            "distributed",
            "failure",
            "storage_path",
            "cache_dir",
            "smoke",
            "inputs",
            "name",
        ):
            raise SpecError(f"search.space.{path}: only trial settings can be searched, not {path.split('.')[0]}")
        if (
            spec.distributed is not None
            and path == "finetune.config.batch_size"
            and dim.choice is None
            and dim.grid is None
        ):
            # a range's inner values are not checked, and most are not multiples of the worker count
            raise SpecError(
                f"search.space.{path}: with distributed.workers, search the batch size with choice or grid "
                f"(each a multiple of {spec.distributed.workers}), not a range"
            )
        _check_values(experiment, f"search.space.{path}", path, dim)
    if spec.defender is not None:
        for path, dim in spec.defender.space.items():
            if path in spec.search.space:
                raise SpecError(f"defender.space.{path}: searched by the attacker (search.space) too")
            if not path.startswith("erase."):
                raise SpecError(f"defender.space.{path}: the defender chooses erasure settings (erase.*) only")
            _check_values(experiment, f"defender.space.{path}", path, dim)
        d = spec.defender
        if d.utility == "clip_score" and not (spec.evaluate.utility or {}).get("clip_score"):
            raise SpecError("defender.utility: clip_score needs evaluate.utility.clip_score (its prompts and CLIP)")
        if d.utility == "retention" and d.retention_floor > 0 and not spec.others:
            raise SpecError(
                "defender.retention_floor: retention is measured on `others` and this spec has none; give them, "
                "or floor the CLIP score (defender.utility: clip_score) when the detector sees only the concept"
            )


def _check_values(experiment: Experiment, field: str, path: str, dim: Dimension) -> None:
    for value in dim.extremes():
        variant = set_path(experiment.data, path, value)
        if variant == experiment.data:
            continue  # the spec's own value: validated already
        try:
            components(validate_structure(variant), like=experiment)
        except SpecError as err:
            raise SpecError(f"{field}: value {value!r} is invalid: {err}") from None
