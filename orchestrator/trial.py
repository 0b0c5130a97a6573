"""One trial: erase -> evaluate -> fine-tune, evaluating every `eval_every` steps, as a chain of stages.

`execute_trial` is plain Python (the benchmark calls it in a loop); `tune_trainable` (trainable.py) is the
same trial as a Ray Tune function trainable. Reports carry `ft_step` (the monotonic step ASHA uses), `presence`,
`resurgence` (= presence - presence right after erasure), `retention` (when the full evaluation ran at
that step: every report, or with `evaluate.full: end` only at the end of each round), `resurgence_proxy`
(with `evaluate.proxy`: the cheap denoising-loss signal, at every report) and once-per-trial constants
(`presence_base`, `presence_erased`, ...).

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
import os
import signal
import tempfile
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
    Probe,
    data_closeness,
    evaluate,
    load_detector,
    load_evaluation,
    load_probe,
    make_probe,
    probe_loss,
    proxy_resurgence,
    save_evaluation,
    save_grid,
    save_probe,
)
from methods.finetune import Distributed, Diverged, Finetuner
from methods.models import DiffusionModel, load_changed, load_model, save_changed, weight_distance
from orchestrator.cache import EraseCache, content_key, open_cache
from orchestrator.ledger import RESUME_KEY
from orchestrator.spec import ExperimentSpec, check_components, resolved_config

log = logging.getLogger("resurgence.trial")

Report = Callable[..., None]  # report(metrics) or report(metrics, checkpoint_folder)


@dataclass
class Erased:
    model: DiffusionModel  # never fine-tuned, only copied
    seconds: float  # what the erasure cost when it ran
    evaluation: Evaluation
    distance: float  # ||theta_erased - theta_base||
    probe_loss: float  # the proxy's denoising loss of the erased model (nan without a proxy)
    cache: str  # where it came from: "miss" (this trial erased), "hit" (the erase cache), "memo" (this worker)


@dataclass
class Warm:
    model: DiffusionModel  # pristine base model: never trained, only copied
    detector: Detector
    base: Evaluation  # evaluation of the base model
    probe: Probe | None  # the proxy's fixed data, drawn by the base model
    probe_loss: float  # the base model's loss on it
    erased: dict[str, Erased] = field(default_factory=dict)  # the last erasure this worker used, by its key


_WARM: dict[str, Warm] = {}  # per worker process, keyed by what determines it


def _concepts(spec: ExperimentSpec) -> list[Concept]:
    return [Concept(c.name, list(c.prompts)) for c in (spec.concept, *spec.others)]


def model_key(spec: ExperimentSpec) -> str:
    """A stable identity of the base model (cache keys of generated data)."""
    return json.dumps(spec.model.model_dump(), sort_keys=True)


def warm_state(spec: ExperimentSpec, configs: dict[str, Any], cache: EraseCache | None = None) -> Warm:
    """This worker's base model, detector, base evaluation and probe. With `cache`, the base evaluation and
    the probe come from the run's cache (computed by one trial for the whole sweep), so a fresh worker, e.g.
    at every wave, only loads the model: on real models the base evaluation is a minute of generation."""
    key = json.dumps(
        [
            spec.model.model_dump(),
            spec.evaluate.model_dump(),
            [c.model_dump() for c in (spec.concept, *spec.others)],
        ],
        sort_keys=True,
    )
    if key not in _WARM:
        _WARM.clear()  # one experiment per worker at a time; don't hold several models
        model = load_model(spec.model.name, spec.model.config, device=spec.model.device, dtype=spec.model.dtype)
        detector = load_detector(spec.evaluate.detector.name, spec.evaluate.detector.config, model.device)

        def assess(folder: Path | None) -> tuple[Evaluation, Probe | None, float]:
            base = evaluate(model, detector, _concepts(spec), configs["evaluate"], embed=True)  # embed: closeness
            probe, loss = None, float("nan")
            if "proxy" in configs:
                probe = make_probe(model, list(spec.concept.prompts), configs["proxy"], configs["evaluate"])
                loss = probe_loss(model, probe)
            if folder is not None:
                save_evaluation(base, folder)
                if probe is not None:
                    save_probe(probe, loss, folder)
            return base, probe, loss

        if cache is None:
            base, probe, loss = assess(None)
        else:
            content = {
                "model": spec.model.model_dump(mode="json"),
                "evaluate": resolved_config(spec)["evaluate"],
                "concepts": [c.model_dump(mode="json") for c in (spec.concept, *spec.others)],
            }

            def produce(folder: Path) -> None:
                assess(folder)

            got = cache.get(content_key("base-evaluation", content), produce)
            base = load_evaluation(got.folder)
            probe, loss = load_probe(got.folder) if "proxy" in configs else (None, float("nan"))
        _WARM[key] = Warm(model, detector, base, probe, loss)
    return _WARM[key]


def erase_content(spec: ExperimentSpec, configs: dict[str, Any]) -> dict[str, Any]:
    """What determines an erased model (the erase cache's address, with the code version)."""
    return {
        "model": spec.model.model_dump(mode="json"),
        "method": spec.erase.method,
        "config": configs["erase"].model_dump(mode="json") if configs["erase"] else {},
        "seed": spec.seed,
        "targets": [spec.concept.model_dump(mode="json")],
        "preserve": [c.model_dump(mode="json") for c in spec.others],
    }


def get_erased(spec: ExperimentSpec, configs: dict[str, Any], warm: Warm, cache: EraseCache | None) -> Erased:
    """The erased model and its evaluation: this worker's memo, else the erase cache (which produces it
    exactly once across all trials), else erased here."""
    concepts = _concepts(spec)
    content = erase_content(spec, configs)
    erase_key = content_key("erased", content)
    eval_key = content_key(
        "evaluation",
        {"erased": erase_key, "evaluate": resolved_config(spec)["evaluate"], "concepts": [c.name for c in concepts]},
    )
    memo_key = f"{erase_key}/{eval_key}"
    if memo_key in warm.erased:
        hit = warm.erased[memo_key]
        return Erased(hit.model, hit.seconds, hit.evaluation, hit.distance, hit.probe_loss, "memo")

    def erase(folder: Path | None) -> tuple[DiffusionModel, float]:
        model = copy.deepcopy(warm.model)
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
        METHODS.get(spec.erase.method).obj.erase(model, request, configs["erase"])
        seconds = time.perf_counter() - start
        if folder is not None:
            save_changed(model, warm.model, folder)
            meta = {"erase_seconds": seconds, "distance": weight_distance(model, warm.model), "content": content}
            (folder / "erased.json").write_text(json.dumps(meta, indent=1))
        return model, seconds

    def assess(model: DiffusionModel, folder: Path | None) -> tuple[Evaluation, float]:
        evaluation = evaluate(model, warm.detector, concepts, configs["evaluate"])
        loss = probe_loss(model, warm.probe) if warm.probe is not None else float("nan")
        if folder is not None:
            save_evaluation(evaluation, folder)
            (folder / "probe.json").write_text(json.dumps({"probe_loss": loss}))
        return evaluation, loss

    if cache is None:
        model, seconds = erase(None)
        evaluation, loss = assess(model, None)
        erased = Erased(model, seconds, evaluation, weight_distance(model, warm.model), loss, "miss")
    else:
        produced: dict[str, Any] = {}

        def produce_model(folder: Path) -> None:
            produced["model"] = erase(folder)[0]

        got = cache.get(erase_key, produce_model)
        log.info("erase cache %s: %s (%s, waited %.1f s)", got.status, erase_key, spec.erase.method, got.waited_s)
        meta = json.loads((got.folder / "erased.json").read_text())
        model = produced.get("model")
        if model is None:
            model = copy.deepcopy(warm.model)
            load_changed(model, got.folder)

        def produce_eval(folder: Path) -> None:
            assess(model, folder)

        ev = cache.get(eval_key, produce_eval)
        evaluation = load_evaluation(ev.folder)
        loss = json.loads((ev.folder / "probe.json").read_text())["probe_loss"]
        erased = Erased(model, meta["erase_seconds"], evaluation, meta["distance"], loss, got.status)
    warm.erased.clear()  # bounded: one erased model per worker
    warm.erased[memo_key] = erased
    return erased


def execute_trial(
    spec: ExperimentSpec,
    report: Report,
    artifact_dir: Path,
    cache: EraseCache | None = None,
    *,
    resume: Path | None = None,
    distributed: Distributed | None = None,
) -> dict[str, Any]:
    """Run one trial and return its last report. With `cache`, erased models come from (and go to) the
    run's erase cache. With `failure.checkpoint_every`, every such step's report also carries a checkpoint
    folder (`report(metrics, folder)`), and `resume` continues from one. `distributed`: this process is one
    rank of a DeepSpeed fine-tune; rank 0 evaluates, every rank reports (Ray Train keeps rank 0's)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    rank0 = distributed is None or distributed.rank == 0
    configs = check_components(spec)
    warm = warm_state(spec, configs, cache)
    concepts = _concepts(spec)
    erased_name = spec.concept.name

    # Stages 1 and 2: the erased model and its evaluation (erased once per erase config and seed).
    stage = get_erased(spec, configs, warm, cache)
    model = copy.deepcopy(stage.model)
    erased = stage.evaluation
    once = {
        "presence_base": warm.base.presence[erased_name],
        "presence_erased": erased.presence[erased_name],
        "retention_base": warm.base.retention(erased_name),
        "retention_erased": erased.retention(erased_name),
        "erase_seconds": stage.seconds,
        "erase_cached": float(stage.cache != "miss"),
        "erase_distance": stage.distance,
    }
    grid = artifact_dir / "samples.png"
    names = [c.name for c in concepts]

    def metrics(step: int, ev: Evaluation | None, loss: float, current: DiffusionModel | None) -> dict[str, Any]:
        """A report; `current` is the model now (None on the ranks that do not evaluate)."""
        out: dict[str, Any] = {"ft_step": step, "ft_loss": loss}
        if ev is not None:  # the full evaluation ran at this step
            p = ev.presence[erased_name]
            out |= {"presence": p, "resurgence": p - once["presence_erased"], "retention": ev.retention(erased_name)}
        if current is not None:
            if warm.probe is not None:
                now = stage.probe_loss if step == 0 else probe_loss(current, warm.probe)
                out["resurgence_proxy"] = proxy_resurgence(now, stage.probe_loss, warm.probe_loss)
            out["ft_distance"] = weight_distance(current, stage.model)
        return {
            **out,
            **once,
            "erase_cache": stage.cache,
            "samples_png": str(grid),
            "trial_seconds": time.perf_counter() - started,  # the trial's own compute so far (wall)
            "trial_cpu_seconds": time.process_time() - cpu_started,  # and the CPU its worker spent on it
        }

    rows = [("base", [warm.base.samples[n] for n in names]), ("erased", [erased.samples[n] for n in names])]
    if rank0:
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
    last = metrics(0, erased, float("nan"), model if rank0 else None)
    state = json.loads((resume / "trial.json").read_text()) if resume is not None else None
    if state is None:
        report(last)
    else:  # a restarted trial: what it reported up to its checkpoint is already known
        last = {**last, **state["last"]}
        print(f"resurgence: trial continues from its checkpoint at ft_step {state['ft_step']}", flush=True)
    ft_cfg = configs["finetune"]
    every_ckpt = spec.failure.checkpoint_every
    offset = 0  # fine-tuning steps of the earlier rounds: ft_step keeps growing across rounds
    tuner: Finetuner | None = None

    def on_eval(step: int, loss: float) -> None:
        nonlocal last
        inject_fault(offset + step, artifact_dir)
        full = spec.evaluate.full == "every" or step == ft_cfg.steps
        with tuner.current_model() as current:  # type: ignore[union-attr]  # ZeRO-3: every rank gathers
            ev = evaluate(current, warm.detector, concepts, configs["evaluate"]) if full and current else None
            if ev is not None:  # before the report: its timings cover the trial's picture too
                save_grid([*rows, (f"ft {offset + step}", [ev.samples[n] for n in names])], names, grid)
            last = metrics(offset + step, ev, loss, current)
        if every_ckpt and (offset + step) % every_ckpt == 0 and (offset + step) < ft_cfg.steps * spec.finetune.rounds:
            with tempfile.TemporaryDirectory(prefix="ckpt-") as folder:
                tuner.save(Path(folder) / "finetune")  # type: ignore[union-attr]
                if rank0:
                    trial_state = {"round": r, "ft_step": offset + step, "last": _plain(last)}
                    (Path(folder) / "trial.json").write_text(json.dumps(trial_state))
                report(last, Path(folder))  # the checkpoint is persisted before report returns
        else:
            report(last)

    for r, (choice, _) in enumerate(spec.finetune.round_datasets()):
        if state is not None and r < state["round"]:
            offset += ft_cfg.steps  # done before the checkpoint; its weights are in the checkpoint
            continue
        round_cfg = ft_cfg.model_copy(update={"seed": ft_cfg.seed + r})  # a fresh data order per round
        tuner = Finetuner(model, data[choice], round_cfg, distributed)
        if state is not None and r == state["round"]:
            tuner.load(resume / "finetune")  # type: ignore[operator]
        try:
            tuner.run(every=spec.finetune.eval_every, callback=on_eval)
        except Diverged as err:  # not a crash: the trial ends here, its outcome recorded
            log.warning("trial ends: %s", err)
            last = {**last, "ft_step": offset + err.step, "ft_loss": err.loss, "diverged": 1.0}
            report(last)
            return last
        offset += ft_cfg.steps
    return last


def inject_fault(step: int, trial_dir: Path) -> None:
    """Fault injection for recovery tests: $RESURGENCE_FAULTS is JSON such as {"raise_at": 10} (raise an
    error) or {"kill_at": 10} (SIGKILL this worker process) when a trial reaches that fine-tuning step, once
    per trial (a marker file in the folder "markers" remembers it), optionally only for trials whose folder
    name contains "only" (Tune names it tune_trainable_<id>_<index>_<values>...: "_1_" is the first trial).
    Unset in normal runs: nothing happens."""
    faults = os.environ.get("RESURGENCE_FAULTS")
    if not faults:
        return
    plan = json.loads(faults)
    # Markers live in plan["markers"] (a folder that outlives the worker: Tune may give a restarted trial a
    # fresh local folder), one per trial folder name.
    marker = Path(plan.get("markers", trial_dir)) / f"{trial_dir.name}.fault-injected"
    if marker.exists() or plan.get("only", "") not in trial_dir.name:
        return
    if step == plan.get("raise_at"):
        marker.write_text("raise")
        raise RuntimeError(f"injected fault at ft_step {step} (RESURGENCE_FAULTS)")
    if step == plan.get("kill_at"):
        marker.write_text("kill")
        os.kill(os.getpid(), signal.SIGKILL)


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


def worker_cache(spec: ExperimentSpec, lease_actor: str | None) -> EraseCache:
    """This worker's handle on the run's erase cache (one per storage and lease actor)."""
    key = (spec.storage_path, lease_actor)
    if key not in _CACHE:
        _CACHE[key] = open_cache(spec.storage_path, Path(spec.cache_dir) / "erased", lease_actor)
    return _CACHE[key]
