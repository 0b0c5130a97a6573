"""One trial: erase -> evaluate -> fine-tune, evaluating every `eval_every` steps, as a chain of stages.

`execute_trial` is plain Python (the benchmarks call it in a loop); `tune_trainable` (trainable.py) is the
same trial as a Ray Tune function trainable. A trial reads one `ResolvedTrial` (orchestrator/resolved.py):
its spec with its searched values applied and every component config typed. The stages:

1. `warm_state`: this worker's base model, detector, base evaluation and probe;
2. `get_erased`: the erased model and its evaluation (erase once, fine-tune many);
3. `finetune_round` for each round of `finetune.rounds`, evaluating every `eval_every` steps
   (`RoundEvaluations`), each evaluation a report (`Reports`) and, every `failure.checkpoint_every` steps,
   a checkpoint.

Reports carry `ft_step` (the monotonic step ASHA uses), `presence`, `resurgence` (= presence - presence right
after erasure), `retention` (when the full evaluation ran at that step: every report, or with
`evaluate.full: end` only at the end of each round), `resurgence_proxy` (with `evaluate.proxy`: the cheap
denoising-loss signal, at every report) and once-per-trial constants (`presence_base`, `presence_erased`, ...).

Erase once, fine-tune many: the erased model and its evaluation come from this worker's memory, else from
the run's erase cache (orchestrator/cache.py: content-addressed, one producer across all trials), else
the trial erases and stores them. Workers are warm: a worker process keeps the base model, its
evaluation, the detector and the proxy's probe across the trials it runs (Tune's `reuse_actors`), and
every trial works on its own copy of the base model.
"""

from __future__ import annotations

import copy
import json
import logging
import resource
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from methods.catalog import DATASETS, METHODS
from methods.datasets.base import DataContext
from methods.detectors.base import Detector, load_detector
from methods.erasers.base import Concept, EraseRequest
from methods.evaluation.intervals import newcombe, wilson
from methods.evaluation.pictures import save_grid
from methods.evaluation.presence import (
    EvalConcept,
    Evaluation,
    data_closeness,
    evaluate,
    load_evaluation,
    save_evaluation,
)
from methods.evaluation.proxy import Probe, load_probe, make_probe, probe_loss, proxy_resurgence, save_probe
from methods.evaluation.utility import Utility
from methods.finetune import Distributed, Diverged, Finetuner
from methods.models import (
    DiffusionModel,
    load_changed,
    load_model,
    peak_memory_mb,
    reset_peak_memory,
    save_changed,
    weight_distance,
)
from orchestrator.cache import EraseCache, content_key, open_cache
from orchestrator.ledger import RESUME_KEY
from orchestrator.resolved import ResolvedTrial

log = logging.getLogger("resurgence.trial")

Report = Callable[..., None]  # report(metrics) or report(metrics, checkpoint_folder)
# Called at every evaluation with (ft_step, the trial's folder), before it runs: how tests break a trial at
# a chosen moment (tests/inject.py). Production adds none.
StepHook = Callable[[int, Path], None]
STEP_HOOKS: list[StepHook] = []


@dataclass
class Erased:
    model: DiffusionModel  # never fine-tuned, only copied
    seconds: float  # what the erasure cost when it ran
    evaluation: Evaluation
    distance: float  # ||theta_erased - theta_base||
    probe_loss: float  # the proxy's denoising loss of the erased model (nan without a proxy)
    cache: str  # where it came from: "miss" (this trial erased), "hit" (the erase cache), "memo" (this worker)
    utility: dict[str, float] = field(default_factory=dict)  # clip_score, fid of the erased model


@dataclass
class Warm:
    model: DiffusionModel  # pristine base model: never trained, only copied
    detector: Detector
    base: Evaluation  # evaluation of the base model
    probe: Probe | None  # the proxy's fixed data, drawn by the base model
    probe_loss: float  # the base model's loss on it
    utility: Utility | None = None  # the utility metrics' networks and reference statistics
    base_utility: dict[str, float] = field(default_factory=dict)  # and the base model's values
    erased: dict[str, Erased] = field(default_factory=dict)  # the last erasure this worker used, by its key


_WARM: dict[str, Warm] = {}  # per worker process, keyed by what determines it


def concepts(trial: ResolvedTrial) -> list[Concept]:
    """The erased concept first, then the others: what is evaluated."""
    return [Concept(c.name, list(c.prompts)) for c in trial.spec.concepts]


def erase_request_concepts(trial: ResolvedTrial) -> tuple[list[Concept], list[Concept]]:
    """What the eraser reads: the erased concepts with their synonyms, and the others to preserve."""
    targets = [Concept(name, prompts) for c in trial.spec.targets for name, prompts in c.erased()]
    return targets, [Concept(c.name, list(c.prompts)) for c in trial.spec.others]


def target_prompts(trial: ResolvedTrial) -> list[str]:
    """Every prompt of the erased concepts (the proxy's probe, the `concept` dataset of relearning attacks)."""
    return [p for c in trial.spec.targets for p in c.prompts]


def eval_concepts(trial: ResolvedTrial) -> list[EvalConcept]:
    """The same concepts as evaluation draws them: their prompt sets' rows (own seeds and guidance) where the
    spec gives one, else their prompts."""
    return [
        EvalConcept(c.name, c.prompt_set.prompts() if c.prompt_set else list(c.prompts)) for c in trial.spec.concepts
    ]


def data_context(trial: ResolvedTrial, base: DiffusionModel, **extra: Any) -> DataContext:
    return DataContext(
        resolution=base.resolution,
        cache_dir=Path(trial.spec.cache_dir),
        model=base,
        model_key=trial.model_key,
        **extra,
    )


# -- stage 1: the warm worker ---------------------------------------------------------------------------
def _measure_utility(utility: Utility | None, model: DiffusionModel, trial: ResolvedTrial) -> dict[str, float]:
    return utility.measure(model, trial.components.evaluate) if utility is not None else {}


def _assess_base(
    trial: ResolvedTrial, model: DiffusionModel, detector: Detector, utility: Utility | None, folder: Path | None
) -> tuple[Evaluation, Probe | None, float, dict[str, float]]:
    """The base model's evaluation (with embeddings: data closeness), the proxy's probe and the utility."""
    c = trial.components
    base = evaluate(model, detector, eval_concepts(trial), c.evaluate, embed=True)
    measured = _measure_utility(utility, model, trial)
    probe, loss = None, float("nan")
    if c.proxy is not None:
        probe = make_probe(model, target_prompts(trial), c.proxy, c.evaluate)
        loss = probe_loss(model, probe)
    if folder is not None:
        save_evaluation(base, folder)
        (folder / "utility.json").write_text(json.dumps(measured))
        if probe is not None:
            save_probe(probe, loss, folder)
    return base, probe, loss, measured


def warm_state(trial: ResolvedTrial, cache: EraseCache | None = None) -> Warm:
    """This worker's base model, detector, base evaluation and probe. With `cache`, the base evaluation and
    the probe come from the run's cache (computed by one trial for the whole sweep), so a fresh worker, e.g.
    at every wave, only loads the model: on real models the base evaluation is a minute of generation."""
    spec, c = trial.spec, trial.components
    key = json.dumps(trial.base_content(), sort_keys=True)
    if key not in _WARM:
        _WARM.clear()  # one experiment per worker at a time; don't hold several models
        model = load_model(spec.model.name, c.model, device=spec.model.device, dtype=spec.model.dtype)
        detector = load_detector(spec.evaluate.detector.name, c.detector, model.device)
        utility = Utility(c.utility, model.device) if c.utility is not None else None
        if cache is None:
            base, probe, loss, measured = _assess_base(trial, model, detector, utility, None)
        else:
            got = cache.get(
                content_key("base-evaluation", trial.base_content()),
                lambda folder: _assess_base(trial, model, detector, utility, folder),
            )
            base = load_evaluation(got.folder)
            probe, loss = load_probe(got.folder, c.proxy) if c.proxy is not None else (None, float("nan"))
            measured = json.loads((got.folder / "utility.json").read_text())
        _WARM[key] = Warm(model, detector, base, probe, loss, utility, measured)
    return _WARM[key]


# -- stage 2: the erased model ----------------------------------------------------------------------------
def _erase(trial: ResolvedTrial, warm: Warm, folder: Path | None) -> tuple[DiffusionModel, float]:
    """Erase the concept from a copy of the base model (and store what changed in `folder`)."""
    model = copy.deepcopy(warm.model)
    targets, preserve = erase_request_concepts(trial)
    request = EraseRequest(
        targets=targets, preserve=preserve, seed=trial.spec.seed, data=data_context(trial, warm.model)
    )
    start = time.perf_counter()
    METHODS.get(trial.spec.erase.method).obj.erase(model, request, trial.components.erase)
    seconds = time.perf_counter() - start
    if folder is not None:
        save_changed(model, warm.model, folder)
        meta = {
            "erase_seconds": seconds,
            "distance": weight_distance(model, warm.model),
            "content": trial.erase_content(),
        }
        (folder / "erased.json").write_text(json.dumps(meta, indent=1))
    return model, seconds


def _assess_erased(
    trial: ResolvedTrial, warm: Warm, model: DiffusionModel, folder: Path | None
) -> tuple[Evaluation, float, dict[str, float]]:
    evaluation = evaluate(model, warm.detector, eval_concepts(trial), trial.components.evaluate)
    loss = probe_loss(model, warm.probe) if warm.probe is not None else float("nan")
    measured = _measure_utility(warm.utility, model, trial)
    if folder is not None:
        save_evaluation(evaluation, folder)
        (folder / "probe.json").write_text(json.dumps({"probe_loss": loss, "utility": measured}))
    return evaluation, loss, measured


def get_erased(trial: ResolvedTrial, warm: Warm, cache: EraseCache | None) -> Erased:
    """The erased model and its evaluation: this worker's memo, else the erase cache (which produces it
    exactly once across all trials), else erased here."""
    erase_key = content_key("erased", trial.erase_content())
    eval_key = content_key(
        "evaluation",
        {
            "erased": erase_key,
            "evaluate": trial.params["evaluate"],
            "evaluator": trial.evaluator,
            "concepts": [c.name for c in concepts(trial)],
        },
    )
    memo_key = f"{erase_key}/{eval_key}"
    if memo_key in warm.erased:
        hit = warm.erased[memo_key]
        return Erased(hit.model, hit.seconds, hit.evaluation, hit.distance, hit.probe_loss, "memo", hit.utility)
    if cache is None:
        model, seconds = _erase(trial, warm, None)
        evaluation, loss, measured = _assess_erased(trial, warm, model, None)
        erased = Erased(model, seconds, evaluation, weight_distance(model, warm.model), loss, "miss", measured)
    else:
        produced: list[DiffusionModel] = []
        got = cache.get(erase_key, lambda folder: produced.append(_erase(trial, warm, folder)[0]))
        log.info("erase cache %s: %s (%s, waited %.1f s)", got.status, erase_key, trial.spec.erase.method, got.waited_s)
        meta = json.loads((got.folder / "erased.json").read_text())
        if produced:
            model = produced[0]
        else:
            model = copy.deepcopy(warm.model)
            load_changed(model, got.folder)
        ev = cache.get(eval_key, lambda folder: _assess_erased(trial, warm, model, folder))
        evaluation = load_evaluation(ev.folder)
        saved = json.loads((ev.folder / "probe.json").read_text())
        loss, measured = saved["probe_loss"], saved["utility"]
        erased = Erased(model, meta["erase_seconds"], evaluation, meta["distance"], loss, got.status, measured)
    warm.erased.clear()  # bounded: one erased model per worker
    warm.erased[memo_key] = erased
    return erased


# -- stage 3: fine-tuning rounds, each evaluated and reported ---------------------------------------------
@dataclass
class Reports:
    """What a trial reports at each evaluation, and its picture (a row of samples per evaluation)."""

    trial: ResolvedTrial
    warm: Warm
    erased: Erased
    once: dict[str, Any]  # the trial's constants, in every report
    grid: Path  # samples.png in the trial's folder
    rows: list[tuple[str, list[Any]]]  # the picture's fixed rows: base and erased samples
    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=time.process_time)

    @property
    def targets(self) -> list[str]:
        return [c.name for c in self.trial.spec.targets]

    def picture(self, label: str, ev: Evaluation | None = None) -> None:
        """The sample grid: base, erased and (with `ev`) the evaluation at `label`."""
        names = [c.name for c in concepts(self.trial)]
        extra = [(label, [ev.samples[n] for n in names])] if ev is not None else []
        save_grid([*self.rows, *extra], names, self.grid)

    def metrics(
        self,
        step: int,
        ev: Evaluation | None,
        loss: float,
        current: DiffusionModel | None,
        utility: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """A report at `step`; `ev`: the full evaluation if it ran; `current`: the model now (None on the ranks
        that do not evaluate); `utility`: the utility metrics if they were measured."""
        out: dict[str, Any] = {"ft_step": step, "ft_loss": loss, **(utility or {})}
        if ev is not None:
            p, n, erased = ev.mean_presence(self.targets), self.once["presence_images"], self.once["presence_erased"]
            out |= {
                "presence": p,
                "resurgence": p - erased,
                "retention": ev.retention(self.targets),
            }
            # 95% intervals over the n images (methods/evaluation/intervals.py)
            out["presence_lo"], out["presence_hi"] = wilson(p, n)
            out["resurgence_lo"], out["resurgence_hi"] = newcombe(p, n, erased, n)
            if len(self.targets) > 1:  # each erased concept's own, beside their mean
                for name in self.targets:
                    out[f"presence.{name}"] = ev.presence[name]
                    out[f"resurgence.{name}"] = ev.presence[name] - self.erased.evaluation.presence[name]
            fired: dict[str, int] = {}
            for name in self.targets:
                for cls, n in ev.counts.get(name, {}).items():
                    fired[cls] = fired.get(cls, 0) + n
            out |= {f"detected.{cls}": n for cls, n in fired.items()}
        if current is not None:
            if self.warm.probe is not None:
                now = self.erased.probe_loss if step == 0 else probe_loss(current, self.warm.probe)
                out["resurgence_proxy"] = proxy_resurgence(now, self.erased.probe_loss, self.warm.probe_loss)
            out["ft_distance"] = weight_distance(current, self.erased.model)
        return {**out, **self.once, "erase_cache": self.erased.cache, "samples_png": str(self.grid), **self.cost()}

    def cost(self) -> dict[str, float]:
        """The trial's own cost so far (orchestrator/metric_names.py TIMING_METRICS)."""
        wall = time.perf_counter() - self.started
        device = self.warm.model.device
        on_cuda = device.type == "cuda"  # a trial holds its device for its whole wall time
        return {
            "trial_seconds": wall,
            "trial_cpu_seconds": time.process_time() - self.cpu_started,
            "trial_device_seconds": wall if on_cuda else 0.0,
            "trial_peak_device_mb": peak_memory_mb(device),
            "trial_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: kB
        }


@dataclass(frozen=True)
class Round:
    """One fine-tuning round: `steps` steps on one data choice, ft_step counting on from the earlier rounds."""

    index: int
    choice: str  # the data choice it fine-tunes on
    offset: int  # fine-tuning steps of the earlier rounds
    config: Any  # methods.finetune.FinetuneConfig, its seed this round's (a fresh data order per round)


def rounds(trial: ResolvedTrial) -> list[Round]:
    ft = trial.components.finetune
    return [
        Round(r, choice, r * ft.steps, ft.model_copy(update={"seed": ft.seed + r}))
        for r, (choice, _) in enumerate(trial.spec.finetune.round_datasets())
    ]


@dataclass(frozen=True)
class Resume:
    """Where a restarted trial continues: the round and step of its checkpoint, what it had reported."""

    round: int
    ft_step: int
    last: dict[str, Any]
    folder: Path  # the checkpoint (trial.json and the fine-tune's own state under finetune/)

    @classmethod
    def read(cls, folder: Path) -> Resume:
        state = json.loads((folder / "trial.json").read_text())
        return cls(int(state["round"]), int(state["ft_step"]), dict(state["last"]), folder)

    @staticmethod
    def write(folder: Path, round_index: int, ft_step: int, last: dict[str, Any]) -> None:
        state = {"round": round_index, "ft_step": ft_step, "last": _plain(last)}
        (folder / "trial.json").write_text(json.dumps(state))


@dataclass
class RoundEvaluations:
    """The fine-tuner's callback for one round: evaluate, report, and every `failure.checkpoint_every` steps
    report with a checkpoint. `last` is the latest report."""

    reports: Reports
    round: Round
    tuner: Finetuner
    report: Report
    artifact_dir: Path
    rank0: bool
    hooks: Sequence[StepHook]
    last: dict[str, Any]

    def __call__(self, step: int, loss: float) -> None:
        trial, ft_step = self.reports.trial, self.round.offset + step
        for hook in self.hooks:
            hook(ft_step, self.artifact_dir)
        full = trial.spec.evaluate.full == "every" or step == self.round.config.steps
        with self.tuner.current_model() as current:  # ZeRO-3: every rank gathers
            ev = None
            if full and current is not None:
                ev = evaluate(current, self.reports.warm.detector, eval_concepts(trial), trial.components.evaluate)
                self.reports.picture(f"ft {ft_step}", ev)  # before the report: its timings cover the picture
            utility = None
            if step == self.round.config.steps and current is not None:  # the round's end
                utility = _measure_utility(self.reports.warm.utility, current, trial)
            self.last = self.reports.metrics(ft_step, ev, loss, current, utility)
        every = trial.spec.failure.checkpoint_every
        total = self.round.config.steps * trial.spec.finetune.rounds
        if not (every and ft_step % every == 0 and ft_step < total):
            self.report(self.last)
            return
        with tempfile.TemporaryDirectory(prefix="ckpt-") as folder:
            self.tuner.save(Path(folder) / "finetune")
            if self.rank0:
                Resume.write(Path(folder), self.round.index, ft_step, self.last)
            self.report(self.last, Path(folder))  # the checkpoint is persisted before report returns


def finetune_round(evaluations: RoundEvaluations, resume: Resume | None) -> bool:
    """Run one round (from `resume`'s checkpoint when it is this round's); False when the fine-tune diverged
    (not a crash: the trial ends with its outcome reported)."""
    rnd = evaluations.round
    if resume is not None and resume.round == rnd.index:
        evaluations.tuner.load(resume.folder / "finetune")
    try:
        evaluations.tuner.run(every=evaluations.reports.trial.spec.finetune.eval_every, callback=evaluations)
    except Diverged as err:
        log.warning("trial ends: %s", err)
        evaluations.last = {**evaluations.last, "ft_step": rnd.offset + err.step, "ft_loss": err.loss, "diverged": 1.0}
        evaluations.report(evaluations.last)
        return False
    return True


def execute_trial(
    trial: ResolvedTrial,
    report: Report,
    artifact_dir: Path,
    cache: EraseCache | None = None,
    *,
    resume: Path | None = None,
    distributed: Distributed | None = None,
    hooks: Sequence[StepHook] | None = None,
) -> dict[str, Any]:
    """Run one trial and return its last report. With `cache`, erased models come from (and go to) the
    run's erase cache. With `failure.checkpoint_every`, every such step's report also carries a checkpoint
    folder (`report(metrics, folder)`), and `resume` continues from one. `distributed`: this process is one
    rank of a DeepSpeed fine-tune; rank 0 evaluates, every rank reports (Ray Train keeps rank 0's).
    `hooks`: called at every evaluation (default STEP_HOOKS)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    rank0 = distributed is None or distributed.rank == 0
    warm = warm_state(trial, cache)
    reset_peak_memory(warm.model.device)
    erased = get_erased(trial, warm, cache)
    model = copy.deepcopy(erased.model)
    named = [c.name for c in concepts(trial)]
    targets = [c.name for c in trial.spec.targets]
    once = {
        "presence_base": warm.base.mean_presence(targets),
        "presence_erased": erased.evaluation.mean_presence(targets),
        "retention_base": warm.base.retention(targets),
        "retention_erased": erased.evaluation.retention(targets),
        "erase_seconds": erased.seconds,
        "erase_cached": float(erased.cache != "miss"),
        "erase_distance": erased.distance,
        "presence_images": sum(warm.base.images.get(t, 0) for t in targets),  # over every erased concept
        **{f"{k}_base": v for k, v in warm.base_utility.items()},
        **{f"{k}_erased": v for k, v in erased.utility.items()},  # also the curves' step 0
    }
    rows = [("base", [warm.base.samples[n] for n in named]), ("erased", [erased.evaluation.samples[n] for n in named])]
    reports = Reports(trial, warm, erased, once, artifact_dir / "samples.png", rows, started, cpu_started)
    if rank0:
        reports.picture("erased")

    ctx = data_context(trial, warm.model, concept_prompts=target_prompts(trial))
    data = {
        choice: DATASETS.get(ds.name).obj(trial.components.datasets[choice], ctx)
        for choice, ds in dict(trial.spec.finetune.round_datasets()).items()
    }
    once["data_closeness"] = data_closeness(
        warm.detector, [d.pixels for d in data.values()], warm.base.mean_embedding(targets)
    )
    last = reports.metrics(0, erased.evaluation, float("nan"), model if rank0 else None, erased.utility)
    state = Resume.read(resume) if resume is not None else None
    if state is None:
        report(last)
    else:  # a restarted trial: what it reported up to its checkpoint is already known
        last = {**last, **state.last}
        print(f"resurgence: trial continues from its checkpoint at ft_step {state.ft_step}", flush=True)
    for rnd in rounds(trial):
        if state is not None and rnd.index < state.round:
            continue  # done before the checkpoint; its weights are in the checkpoint
        evaluations = RoundEvaluations(
            reports,
            rnd,
            Finetuner(model, data[rnd.choice], rnd.config, distributed),
            report,
            artifact_dir,
            rank0,
            STEP_HOOKS if hooks is None else hooks,
            last,
        )
        ok = finetune_round(evaluations, state)
        last = evaluations.last
        if not ok:
            break
    return last


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able part of a report (numbers and text)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str) and not isinstance(v, bool)}


def resume_checkpoint(config: dict[str, Any]) -> Any:
    """The checkpoint a dead driver's run of this trial left (a continued sweep passes it in the config),
    if it is still there."""
    from ray import tune

    uri = config.get(RESUME_KEY)
    if not uri:
        return None
    checkpoint = tune.Checkpoint(uri)
    try:
        if checkpoint.filesystem.get_file_info(checkpoint.path).type.name == "Directory":
            return checkpoint
    except OSError:
        pass
    log.warning("the checkpoint %s a dead driver's run of this trial left is gone; the trial starts over", uri)
    return None


_CACHE: dict[tuple[str, str | None], EraseCache] = {}


def worker_cache(trial: ResolvedTrial, lease_actor: str | None) -> EraseCache:
    """This worker's handle on the run's erase cache (one per storage and lease actor)."""
    spec = trial.spec
    key = (spec.storage_path, lease_actor)
    if key not in _CACHE:
        _CACHE[key] = open_cache(spec.storage_path, Path(spec.cache_dir) / "erased", lease_actor)
    return _CACHE[key]
