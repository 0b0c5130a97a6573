"""A 10,000-trial campaign on a simulated cluster of 8 nodes x 8 GPUs: GPU occupancy and driver overhead.

The cluster is `ray.cluster_utils.Cluster` on this one machine: a head node with 0 GPUs (the driver's node) and
`--nodes` worker nodes that declare `--gpus-per-node` logical GPUs and as many logical CPUs (nothing runs on a real
GPU). The campaign goes through Ray Tune the way the orchestrator drives it (orchestrator/search.py): a function
trainable with {"cpu": 1, "gpu": 1}, `reuse_actors=True`, `OptunaSearch` on one persistent Optuna study
(JournalStorage, same study_name every wave), ASHA on the monotonic `ft_step`, `TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1`,
in waves of `--wave-size` trials (one `Tuner.fit()` each) so that Tune's per-trial state is dropped after every wave.
A trial sleeps for the stage times of SD v1.4 or SDXL (table below: seconds on one H200, measured by
`gpu_stage_times.py`) divided by `--time-scale`: a warm-up on a fresh worker (load the base model and detector,
evaluate the base model), the erasure (once per erase config, through a small named actor, the erase-once cache), then
fine-tuning in chunks of `--eval-every` steps, each followed by an evaluation and a report of `ft_step` and a
synthetic `resurgence`.

    python benchmarks/sim_cluster.py                       # full scale: 10,000 trials on 8 x 8 GPUs (~25 min here)
    python benchmarks/sim_cluster.py --nodes 2 --gpus-per-node 4 --trials 200 --wave-size 100   # ~1.5 min
    python benchmarks/sim_cluster.py --no-overlap          # waves strictly one after another, as run_waves runs them
    python benchmarks/sim_cluster.py --model sdxl --time-scale 40    # SDXL: trials ~4x longer in real time
    python benchmarks/sim_cluster.py --sampler tpe --trials 2000     # Optuna's TPE: its cost grows with the study
    python benchmarks/sim_cluster.py --out run.json        # also the per-trial records, for later analysis

Printed: the stage table (real and scaled seconds), a line per wave, then one summary block to paste in a note: wall
time; GPU occupancy overall and in the steady window (from the first to the last moment all GPUs are busy, i.e.
without the ramp-up and ramp-down tails); per wave; the gap between consecutive trials on a GPU; driver CPU per trial,
peak RSS and RSS after each wave; ASHA's early stops; erasures against erase configs; actors started against actors
that ran trials; the machine's CPU by process kind and memory; and the occupancy at real time, two ways: the steady
state (the per-trial gap measured here does not shrink with the time scale, the trials grow by `--time-scale`), and
a replay of the measured trials at real durations on the same GPUs with that gap, overlapped and sequential waves.

Definitions. Occupancy = sum over trials of GPU-busy seconds / (GPUs x wall time from the first trial start to the
last trial end). GPU-busy is the time inside the trial function (time.time() at entry and at its last report, sent in
every report since ASHA may stop any of them); "modelled work" counts only the sleeps that stand for GPU work
(excluding time blocked in `tune.report` and waiting for another trial's erasure).

Measured with the earlier stage table, A100-class estimates (an evaluation of 65 s where 15 s is now measured, so
trials ~3x longer in real time; the default --time-scale was 30, which gave trials here about the length that 10 gives
now). Not yet rerun with the measured table: at real durations the fixed gap between trials on a GPU weighs ~3x more,
so the replayed figures below are upper bounds. Then-default command (time scale 30), 2 cores shared, Nov 2026: 10,000
trials in 22.7 min (1288 s from the first trial start to the last end, against 702 s of modelled work / 64 GPUs);
occupancy 63% overall, 98% in the steady window (wave 0: 12.5 trials/s, a gap of 0.09 s between trials on a GPU);
driver 31 ms CPU per trial, peak RSS 0.81 GiB. Replayed at real durations (10.7 h of simulated campaign): 98.9% with
overlapped waves, 94.3% sequential. With `--time-scale 10 --wave-size 5000` (Dec 2026, 40 min, machine otherwise quiet
but for short tests): occupancy 94.3% overall, 96.1% steady (91.4% / 93.2% counting modelled GPU work only); the wave
boundary (one ~2-minute stretch at 47%) and the final tail are what is lost; driver 46.8 ms CPU per trial, RSS 0.52 ->
0.53 GiB after the waves; replayed at real durations 98.5% overlapped, 97.0% sequential. With `--time-scale 10
--wave-size 10000` (one wave, Dec 2026, 39 min, machine quiet): 97.2% overall, 98.8% steady (94.0% / 95.7% modelled
work only); timeline bins 83 99 ... 97 99 98 98 82 (ramp-up and final tail only); driver 68.2 ms CPU per trial
(searcher 21 ms), RSS 0.73 GiB after the wave, peak 1.14 GiB; replayed at real durations 99.0%.

What limits it here (none of it scales with --time-scale, so at real durations it fades; see the replay):
- CPU, not memory: 64 actors + 9 raylets (plus dashboard/runtime-env agents) take ~10 GiB; a new trial actor costs
  ~1.5-4 CPU-s (Python + `import ray.tune`), so 64 of them take ~60 s on 2 cores, at every wave (Tune actors cannot
  outlive their Tuner). The default wave size pays that 3 times.
- Tune's actor reuse hands a cached actor to any pending trial and kills the actor that trial was already starting:
  when starts take ~60 s and trials ~5 s, this churns (713 actors started, 239 ran trials, at full scale). Many
  staged trials (--pending, default the GPU count) make it rarer; with TUNE_MAX_PENDING_TRIALS_PG=8 it was 300/18.
- Optuna: the TPE sampler's ask() grows with the study (4.5 ms at 100 trials, 25 ms at 2,500, ~100 ms at 5,000-10,000;
  random: 3-6 ms), too slow for 12 trials/s on one driver core but ~5% of a core at a real campaign's 0.5 trials/s;
  hence `--sampler random` by default here. The study lives in the driver's memory (~5 KiB per trial).

Ray here: RAY_TMPDIR and the Ray session live in a fresh /tmp/simc* folder (this script's processes are found by it),
token authentication is off unless RAY_AUTH_MODE is set (no token is written under ~/.ray), and the driver's log
streaming is off. Tune, Ray and the cluster are shut down at the end, on errors, on Ctrl-C and on SIGTERM. A
`ray stop` run elsewhere on the machine kills this cluster too (it matches processes by name).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import math
import os
import random
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import threading
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------------------------------
# Stage times, in seconds on one GPU (real time; the simulation divides them by --time-scale). Measured on one NVIDIA
# H200 (Dec 2026) by benchmarks/gpu_stage_times.py: this project's own code (methods/) on SD v1.4's and SDXL's
# architectures built from their configs, bf16, torch 2.11 eager, with the figures of its two runs there. Where a
# figure is an estimate, the comment says so.
# --------------------------------------------------------------------------------------------------------------------
# Image generation, 50 DDIM steps with classifier-free guidance, per image at the evaluation's batch of 16 (at batch
# 1, launch-bound: SD v1.4 2.6-4.0 s, SDXL 6.2-6.6 s per image).
SD14_IMAGE_S = 0.366
SDXL_IMAGE_S = 2.081
# Images per evaluation: 20 of the erased concept + 20 of the others (presence, retention; docs/background.md §4)
# says 25-100 per concept is typical; 40 in all is our choice for a search that evaluates every chunk.
EVAL_IMAGES = 40
# Classifying 40 images at 224 px with a CLIP ViT-L/14 vision tower: 0.017 s (measured); rounded up to 0.1 s for
# moving the images and the zero-shot head.
CLASSIFY_S = 0.1


@dataclasses.dataclass(frozen=True)
class ModelTimes:
    erase: dict[str, float]  # one erasure, by method, including writing the erased weights to the cache
    warm: float  # a fresh worker loads the base model and the detector (then evaluates the base model, `eval`)
    load: float  # a trial whose erase config is cached loads the erased weights into its warm worker
    ft_step: dict[str, float]  # one fine-tuning optimizer step (forward, backward, AdamW), by trainable subset
    eval: float  # one evaluation: EVAL_IMAGES images at 50 DDIM steps, then classified


STAGES: dict[str, ModelTimes] = {
    "sd14": ModelTimes(
        erase={
            # ESD (Gandikota 2023) at the paper's 1000 iterations, batch 1: 1.72 s per iteration (partial DDIM
            # sampling with the frozen copy, 3 frozen forwards, one trained forward/backward), measured; an upper
            # bound (every UNet weight got a gradient in that run, ESD-x needs the cross-attention's only).
            "esd": 1716.0,
            # UCE (Gandikota 2024): the closed form on the 32 K/V matrices with the text encoding, 0.40 s, and
            # writing the changed weights (36.6 MiB), 0.09 s: measured.
            "uce": 0.5,
            # MACE (Lu 2024), one concept at the official object settings: 8 drawn images, closed-form refinement,
            # 50 LoRA steps, fusion: 15.0 s measured (without GroundedSAM masks, ~1 s per image more with them).
            "mace": 15.0,
            # Few-shot text-encoder erasure (Fuchi & Takagi 2024) at its defaults, its 4 drawn images included:
            # 6.2 s measured (the paper: "under 10 s").
            "fewshot": 6.2,
        },
        # The base pipeline (2.0 GB of safetensors) through load_model: 1.2 s from the page cache (measured), ~2 s
        # at 1 GB/s from shared storage; the detector ~1 s (estimate).
        warm=3.0,
        # The cached erasure: UCE's 36.6 MiB load in 0.02 s (measured); ESD-u's whole UNet (1.7 GB) at 1 GB/s from
        # shared storage is the upper bound used here.
        load=1.7,
        # Batch 4 at 512 px, bf16 autocast, fp32 master weights of what trains, AdamW: measured per subset. LoRA
        # (rank 4 on every attention projection) is the slowest: launch-bound, its adapters add small kernels.
        ft_step={"full": 0.214, "xattn": 0.119, "lora": 0.275, "text_encoder": 0.155},
        eval=EVAL_IMAGES * SD14_IMAGE_S + CLASSIFY_S,  # 40 x 0.366 + 0.1 = 14.7 s
    ),
    "sdxl": ModelTimes(
        erase={
            # ESD on SDXL, 1000 iterations at 3.59 s each (measured).
            "esd": 3593.0,
            # UCE on SDXL's 140 K/V matrices and two text encoders: 1.18 s, writing 650 MiB 0.39 s (measured).
            "uce": 1.6,
            # MACE on SDXL at the same settings: 48.8 s (measured).
            "mace": 48.8,
            # Few-shot on both text encoders, its 4 drawn images included: 14.8 s (measured).
            "fewshot": 14.8,
        },
        # The base pipeline (6.6 GB) through load_model: 4.0 s from the page cache (measured), ~7 s from shared
        # storage at 1 GB/s; the detector ~1 s (estimate).
        warm=8.0,
        # UCE's 650 MiB load in 0.11 s (measured); ESD-u's whole UNet (5.1 GB) at 1 GB/s is the upper bound used.
        load=5.1,
        # Batch 2 at 1024 px, one GPU, no gradient checkpointing (the full UNet's step peaks at 62 GiB): measured.
        ft_step={"full": 0.559, "xattn": 0.395, "lora": 0.830, "text_encoder": 0.406},
        eval=EVAL_IMAGES * SDXL_IMAGE_S + CLASSIFY_S,  # 40 x 2.081 + 0.1 = 83.3 s
    ),
}
ERASE_STRENGTHS = (0, 1, 2)  # e.g. ESD's lr / eta, UCE's lambda, MACE's lamb: 3 settings per method
FT_STEPS = (100, 200, 300)  # fine-tuning budgets (docs/background.md §3: attacks of 50-100 steps, up to 300 evaluated)
LR_RANGE = (1e-6, 1e-4)  # docs/background.md §3: lr 1e-6..1e-4

CACHE_ACTOR = "erase_cache"
NAMESPACE = "sim_cluster"
_WORKER: dict[str, Any] = {}  # per trial-actor process: the erase cache's handle, the model it has warm


# --------------------------------------------------------------------------------------------------------------------
# The trial (runs in a Ray worker)
# --------------------------------------------------------------------------------------------------------------------
def synthetic_resurgence(config: dict[str, Any], step: int, rng: random.Random) -> float:
    """A made-up resurgence curve with an optimum in the space, so the searcher and ASHA have something to rank:
    best near lr 3e-5, full fine-tuning > LoRA/xattn > text encoder, weaker erasures resurge more; plus noise."""
    lr_fit = math.exp(-((math.log10(config["lr"]) + 4.5) ** 2) / (2 * 0.6**2))
    gain = {"full": 0.9, "xattn": 0.7, "lora": 0.6, "text_encoder": 0.4}[config["trainable"]]
    hold = {"esd": 0.5, "uce": 0.3, "mace": 0.6, "fewshot": 0.2}[config["erase_method"]]
    hold *= 0.8 + 0.2 * config["erase_strength"]
    speed = 1.0 - math.exp(-step * config["lr"] / 2e-3)  # resurgence grows with steps, faster at a larger lr
    return gain * lr_fit * (1.0 - 0.5 * hold) * speed + rng.gauss(0.0, 0.03)


def sim_trial(config: dict[str, Any], scale: float, eval_every: int, seed: int) -> None:
    """Tune function trainable: sleep for the modelled stages, reporting after every evaluation."""
    import ray
    from ray import tune

    t_start = time.time()
    work = 0.0  # seconds slept standing for GPU work (scaled)
    wait = 0.0  # seconds waiting for another trial's erasure of the same config (GPU idle)
    times = STAGES[config["model"]]
    gpu_ids = ray.get_gpu_ids()
    slot = f"{ray.get_runtime_context().get_node_id()[:12]}/{','.join(str(g) for g in gpu_ids)}"
    key = f"{config['model']}/{config['erase_method']}/{config['erase_strength']}"
    rng = random.Random(zlib.crc32(json.dumps([seed, config], sort_keys=True).encode()))

    def work_for(seconds_real: float) -> None:
        nonlocal work
        time.sleep(seconds_real / scale)
        work += seconds_real / scale

    # Stage 0, once per worker process and model (reuse_actors keeps workers warm): load the base model and the
    # detector, evaluate the base model.
    warmed = _WORKER.get("warm") != config["model"]
    if warmed:
        work_for(times.warm + times.eval)
        _WORKER["warm"] = config["model"]

    # Stage 1: erase and evaluate the erased model, or take it from the erase-once cache.
    erase_real = times.erase[config["erase_method"]] + times.eval
    if "cache" not in _WORKER:  # one lookup per actor process (reuse_actors keeps this function loaded)
        _WORKER["cache"] = ray.get_actor(CACHE_ACTOR, namespace=NAMESPACE)
    cache = _WORKER["cache"]
    ready_at = ray.get(cache.claim.remote(key, erase_real / scale))
    erased = ready_at is None
    if erased:
        work_for(erase_real)
    else:
        pause = ready_at - time.time()
        if pause > 0:  # another trial is erasing this config right now: wait for it rather than erase twice
            time.sleep(pause)
            wait += pause
        work_for(times.load)

    def report(step: int, value: float) -> None:
        tune.report(
            {
                "ft_step": step,
                "resurgence": value,
                "steps": config["steps"],
                "t_start": t_start,
                "t_end": time.time(),
                "work_s": work,
                "wait_s": wait,
                "erased": int(erased),
                "warmed": int(warmed),
                "slot": slot,
                "pid": os.getpid(),  # the trial actor's process: distinct pids = actors started
            }
        )

    report(0, 0.0)  # the erased model's evaluation (step 0), as the orchestrator reports it
    chunk_real = eval_every * times.ft_step[config["trainable"]] + times.eval
    for step in range(eval_every, config["steps"] + 1, eval_every):
        work_for(chunk_real)  # eval_every fine-tuning steps, then one evaluation
        report(step, synthetic_resurgence(config, step, rng))


# --------------------------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Record:
    """One finished trial, as the driver saw its last report."""

    wave: int
    t_start: float
    t_end: float
    work_s: float
    wait_s: float
    ft_step: int
    steps: int
    slot: str
    erased: int
    warmed: int
    pid: int
    reports: int

    @property
    def busy(self) -> float:
        return self.t_end - self.t_start


def make_collector(wave: int, n_trials: int) -> Any:
    from ray import tune

    class Collector(tune.Callback):
        """Keeps each running trial's last report (small tuples), then a `Record` once it ends."""

        def __init__(self) -> None:
            self.last: dict[str, tuple] = {}
            self.reports: dict[str, int] = defaultdict(int)
            self.records: list[Record] = []
            self.started = 0
            self.errors = 0
            self.launched = threading.Event()  # set when the wave has started all its trials (its tail begins)
            self.t_last_launch = math.nan

        def __reduce__(self) -> tuple:
            # The Tuner pickles its callbacks for a later restore; a restored run would not need this one's
            # live state (an Event cannot be pickled anyway): it comes back as a no-op callback.
            return (tune.Callback, ())

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.started += 1
            if self.started >= n_trials:
                self.t_last_launch = time.time()
                self.launched.set()

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            r = result
            self.last[trial.trial_id] = (
                r["t_start"],
                r["t_end"],
                r["work_s"],
                r["wait_s"],
                r["ft_step"],
                r["steps"],
                r["slot"],
                r["erased"],
                r["warmed"],
                r["pid"],
            )
            self.reports[trial.trial_id] += 1

        def _finish(self, trial: Any) -> None:
            last = self.last.pop(trial.trial_id, None)
            n = self.reports.pop(trial.trial_id, 0)
            if last is not None:
                self.records.append(Record(wave, *last, reports=n))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._finish(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self.errors += 1
            self._finish(trial)

    return Collector()


def make_searcher(args: argparse.Namespace, storage: Any, wave: int) -> Any:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class TimedOptunaSearch(OptunaSearch):
        """OptunaSearch that adds up the driver time spent in the searcher (suggest, results, completions)."""

        seconds = 0.0
        suggests = 0

        def suggest(self, trial_id: str) -> Any:
            t = time.perf_counter()
            try:
                return super().suggest(trial_id)
            finally:
                self.seconds += time.perf_counter() - t
                self.suggests += 1

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            t = time.perf_counter()
            super().on_trial_result(trial_id, result)
            self.seconds += time.perf_counter() - t

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            t = time.perf_counter()
            super().on_trial_complete(trial_id, result, error)
            self.seconds += time.perf_counter() - t

    seed = args.seed * 1000 + wave  # a fresh RNG stream per wave; the history comes from the shared study
    if args.sampler == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    # Same study_name every wave: the study is loaded from the journal and the search continues across waves.
    return TimedOptunaSearch(sampler=sampler, storage=storage, study_name="sim_cluster")


def param_space(model: str) -> dict[str, Any]:
    from ray import tune

    return {
        "model": tune.choice(["sd14", "sdxl"]) if model == "mix" else tune.choice([model]),
        "erase_method": tune.choice(sorted(STAGES["sd14"].erase)),
        "erase_strength": tune.choice(list(ERASE_STRENGTHS)),
        "lr": tune.loguniform(*LR_RANGE),
        "steps": tune.choice(list(FT_STEPS)),
        "trainable": tune.choice(sorted(STAGES["sd14"].ft_step)),
    }


@dataclasses.dataclass
class WaveResult:
    wave: int
    trials: int
    fit_start: float
    fit_end: float
    last_launch: float
    records: list[Record]
    errors: int
    searcher_s: float
    suggests: int
    driver_cpu_s: float  # driver CPU (whole process) at the end of the wave, since the campaign started
    driver_rss: int  # bytes, right after the wave, a gc and a heap trim
    driver_blocks: int  # Python's allocated memory blocks at that moment
    exception: str | None = None


def run_wave(
    args: argparse.Namespace,
    wave: int,
    n_trials: int,
    storage: Any,
    root: Path,
    stop_event: threading.Event,
    collector: Any,
    cpu0: float,
) -> WaveResult:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    gpus = args.nodes * args.gpus_per_node
    searcher = make_searcher(args, storage, wave)

    class StopOnInterrupt(tune.Stopper):
        def __call__(self, trial_id: str, result: dict) -> bool:
            return False

        def stop_all(self) -> bool:
            return stop_event.is_set()

        def __reduce__(self) -> tuple:
            return (tune.stopper.NoopStopper, ())  # pickled for restore, like the callbacks: drop the Event

    def make_tuner() -> Any:
        return tune.Tuner(
            tune.with_resources(
                tune.with_parameters(sim_trial, scale=args.time_scale, eval_every=args.eval_every, seed=args.seed),
                {"cpu": 1, "gpu": 1},
            ),
            param_space=param_space(args.model),
            tune_config=tune.TuneConfig(
                metric="resurgence",
                mode="max",  # the adversary looks for the fine-tuning that brings the concept back the most
                search_alg=searcher,
                scheduler=ASHAScheduler(
                    time_attr="ft_step", max_t=max(FT_STEPS), grace_period=args.eval_every, reduction_factor=3
                ),
                num_samples=n_trials,
                # The GPU count (what the orchestrator sets) plus --pending staged trials. Tune caches a finished
                # trial's actor only if a staged trial needs its resources (or the cache is empty), and hands a
                # cached actor to any pending trial, killing the actor that trial may already be starting. When
                # actors start slowly (here: 60 s on 2 cores) against short trials, that churns actors; many
                # staged trials (most of them only waiting for a placement group) make such kills rare.
                max_concurrent_trials=gpus + args.pending,
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=f"wave{wave:03d}",
                storage_path=str(root / "tune"),
                callbacks=[collector],
                stop=StopOnInterrupt(),
                verbose=0,
            ),
        )

    t0 = time.time()
    error = None
    tuner = None
    try:
        tuner = make_tuner()
        tuner.fit()
    except Exception as exc:  # reported in the summary; the campaign goes on with the next wave
        error = f"{type(exc).__name__}: {exc}"
    t1 = time.time()
    del tuner
    gc.collect()
    blocks = sys.getallocatedblocks()  # Python objects alive: flat across waves = no leak, whatever RSS does
    trim_heap()
    return WaveResult(
        wave=wave,
        trials=n_trials,
        fit_start=t0,
        fit_end=t1,
        last_launch=collector.t_last_launch,
        records=collector.records,
        errors=collector.errors,
        searcher_s=searcher.seconds,
        suggests=searcher.suggests,
        driver_cpu_s=cpu_seconds() - cpu0,
        driver_rss=current_rss(),
        driver_blocks=blocks,
        exception=error,
    )


def count_trial_actors() -> int | str:
    """Trial actors Ray created in all (alive or dead), from the GCS actor table: against the actors that ran
    trials, this shows actors started and then discarded (a Ray internal: orchestrator/ray_internals.py)."""
    try:
        from orchestrator.ray_internals import trial_actor_count

        return trial_actor_count()
    except Exception as exc:  # diagnostics only
        return f"? ({type(exc).__name__})"


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so that RSS after a wave shows live memory, not what the
    allocator kept (each wave runs in its own thread, with its own malloc arena)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class Monitor(threading.Thread):
    """Samples this script's process tree every `period` s: CPU by process kind, RSS, processes, trial actors."""

    def __init__(self, period: float = 5.0) -> None:
        super().__init__(daemon=True, name="monitor")
        import psutil

        self.psutil = psutil
        self.period = period
        self.root = psutil.Process()
        self.stop_event = threading.Event()
        self.cpu_by_pid: dict[int, float] = {}
        self.kind_by_pid: dict[int, str] = {}
        self.cpu_by_kind: dict[str, float] = defaultdict(float)
        self.peak_rss = 0  # sum of RSS over the tree (overcounts shared pages)
        self.peak_procs = 0
        self.peak_actors = 0  # live trial actors (ray::ImplicitFunc...)
        self.min_available = math.inf  # machine's available memory
        self.thread_cpu = 0.0  # this thread's own CPU, taken out of the driver's figures
        self.sys0 = psutil.cpu_times()
        self.t0 = time.time()

    def kind(self, p: Any) -> str:
        try:
            name = p.name()
            cmd = " ".join(p.cmdline()[:3])
        except self.psutil.Error:
            return "gone"
        if p.pid == self.root.pid:
            return "driver"
        for key, label in (
            ("ImplicitFunc", "trial actors"),
            ("EraseCache", "erase-cache actor"),
            ("IDLE", "idle workers"),
            ("default_worker", "workers booting"),
            ("raylet", "raylets"),
            ("gcs_server", "gcs"),
            ("DashboardAgent", "dashboard agents"),
            ("RuntimeEnvAgent", "runtime-env agents"),
            ("runtime_env", "runtime-env agents"),
            ("dashboard", "dashboard agents"),
            ("log_monitor", "log monitor"),
            ("monitor.py", "autoscaler monitor"),
            ("reaper", "process reaper"),
        ):
            if key in name or key in cmd:
                return label
        return "other (" + cmd[-40:] + ")"

    def sample(self) -> None:
        ps = self.psutil
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except ps.Error:
            return
        rss = 0
        actors = 0
        for p in procs:
            try:
                with p.oneshot():
                    t = p.cpu_times()
                    total = t.user + t.system
                    rss += p.memory_info().rss
                    k = self.kind(p)
            except ps.Error:
                continue
            if k == "trial actors":
                actors += 1
            delta = total - self.cpu_by_pid.get(p.pid, 0.0)
            self.cpu_by_pid[p.pid] = total
            self.kind_by_pid[p.pid] = k
            self.cpu_by_kind[k] += delta
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_procs = max(self.peak_procs, len(procs))
        self.peak_actors = max(self.peak_actors, actors)
        self.min_available = min(self.min_available, ps.virtual_memory().available)

    def run(self) -> None:
        while not self.stop_event.wait(self.period):
            t = time.thread_time()
            self.sample()
            self.thread_cpu += time.thread_time() - t

    def finish(self) -> dict[str, Any]:
        t = time.thread_time()
        self.sample()
        self.thread_cpu += time.thread_time() - t
        self.stop_event.set()
        sys1 = self.psutil.cpu_times()
        busy = sum(getattr(sys1, f) - getattr(self.sys0, f) for f in ("user", "system", "nice", "irq", "softirq"))
        total = busy + (sys1.idle - self.sys0.idle) + (getattr(sys1, "iowait", 0) - getattr(self.sys0, "iowait", 0))
        wall = time.time() - self.t0
        return {
            "machine_cpu_busy": busy / total if total else math.nan,
            "cores": os.cpu_count(),
            "tree_cpu_s": sum(self.cpu_by_kind.values()),
            "wall_s": wall,
            "cpu_by_kind": dict(sorted(self.cpu_by_kind.items(), key=lambda kv: -kv[1])),
            "peak_rss": self.peak_rss,
            "peak_procs": self.peak_procs,
            "peak_actors": self.peak_actors,
            # Ray worker processes seen (sampled every `period` s, so short-lived ones may be missed)
            "workers_seen": sum(
                1 for k in self.kind_by_pid.values() if k in ("trial actors", "idle workers", "workers booting")
            ),
            "min_available": self.min_available,
        }


def start_cluster(args: argparse.Namespace, root: Path) -> tuple[Any, Any]:
    """Head (0 GPUs, the driver's node) + N worker nodes with logical GPUs and CPUs; returns (cluster, cache)."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    store = args.object_store_mib * 1024**2
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,  # the erase-cache actor and nothing else; trials need a GPU
            "num_gpus": 0,
            "object_store_memory": store,
            "include_dashboard": False,
            "include_log_monitor": False,  # nothing to stream: the driver does not print workers' logs
            "temp_dir": str(root / "ray"),
        },
    )
    for _ in range(args.nodes):
        cluster.add_node(
            num_cpus=args.gpus_per_node,  # logical CPUs: one per trial (this machine has far fewer cores)
            num_gpus=args.gpus_per_node,
            object_store_memory=store,
            temp_dir=str(root / "ray"),
        )
    ray.init(address=cluster.address, namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)

    @ray.remote(num_cpus=0)
    class EraseCache:
        """The erase-once cache, by erase config: who erases, and when the erased weights are ready."""

        def __init__(self) -> None:
            self.ready_at: dict[str, float] = {}
            self.claims = 0

        def claim(self, key: str, seconds: float) -> float | None:
            """None: the caller erases (first claim). Else the time the erased weights are (or will be) ready."""
            self.claims += 1
            if key in self.ready_at:
                return self.ready_at[key]
            self.ready_at[key] = time.time() + seconds
            return None

        def stats(self) -> dict[str, int]:
            return {"erase_configs": len(self.ready_at), "claims": self.claims}

    head_id = ray.get_runtime_context().get_node_id()
    cache = EraseCache.options(
        name=CACHE_ACTOR, scheduling_strategy=NodeAffinitySchedulingStrategy(head_id, soft=False)
    ).remote()
    ray.get(cache.stats.remote())
    return cluster, cache


# --------------------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------------------
def busy_in(records: list[Record], lo: float, hi: float, *, work: bool = False) -> float:
    """GPU-busy seconds inside [lo, hi]: the in-function interval clipped to the window (or, with `work`, the
    modelled-work share of that clipped time)."""
    total = 0.0
    for r in records:
        clip = min(r.t_end, hi) - max(r.t_start, lo)
        if clip > 0:
            total += clip * (r.work_s / r.busy if work and r.busy > 0 else 1.0)
    return total


def steady_window(records: list[Record]) -> tuple[float, float, int]:
    """From the first moment the most GPUs are busy (all of them once the cluster fills) to the last; and that count.
    Outside it are the ramp-up and the ramp-down tails."""
    events = sorted([(r.t_start, 1) for r in records] + [(r.t_end, -1) for r in records])
    running = peak = 0
    for _, d in events:
        running += d
        peak = max(peak, running)
    running = 0
    first = end = math.nan
    for t, d in events:
        running += d
        if running == peak and d == 1 and math.isnan(first):
            first = t
        if running == peak - 1 and d == -1:
            end = t
    return first, end, peak


def slot_gaps(records: list[Record], lo: float, hi: float) -> list[float]:
    """Idle time between consecutive trials of a wave on the same GPU inside [lo, hi]: the per-trial scheduling gap
    (with reuse_actors, the same actor)."""
    by_slot: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_slot[r.slot].append(r)
    gaps = []
    for rs in by_slot.values():
        rs.sort(key=lambda r: r.t_start)
        for a, b in zip(rs, rs[1:], strict=False):
            if a.t_end >= lo and b.t_start <= hi and a.wave == b.wave:  # a new wave means a new actor: not a gap
                gaps.append(max(0.0, b.t_start - a.t_end))
    return gaps


def timeline(records: list[Record], gpus: int, lo: float, hi: float, bins: int) -> list[float]:
    width = (hi - lo) / bins
    return [busy_in(records, lo + i * width, lo + (i + 1) * width) / (gpus * width) for i in range(bins)]


def replay(
    waves: list[WaveResult], gpus: int, scale: float, gap: float, actor_start: float, overlap: bool
) -> tuple[float, float, float]:
    """Replays the measured trials at real durations on `gpus` GPUs; returns (occupancy, modelled-work occupancy,
    wall seconds from the first trial start to the last end).

    A trial lasts (modelled work + erasure wait) x scale, plus its measured non-work time (report round trips: a
    fixed cost, not scaled). Trials of a wave start in the order they started here, each on the first GPU to free
    up: `gap` s after the previous trial of the same wave on that GPU (the steady gap measured here, an upper
    bound), or `actor_start` s after it if the GPU's last actor belonged to another wave (a new actor). Waves start
    as this run did: with `overlap`, once the previous wave has launched its last trial; else once it has ended.
    ASHA's decisions are replayed as they were made (same trial lengths)."""
    import heapq

    free = [(0.0, g, -1) for g in range(gpus)]  # (time the GPU frees up, GPU, wave of its actor)
    heapq.heapify(free)
    busy = work = 0.0
    first, last = math.inf, 0.0
    ready = 0.0  # earliest start of the current wave's trials
    for w in waves:
        launched = ended = ready
        for r in sorted(w.records, key=lambda r: r.t_start):
            t, g, owner = heapq.heappop(free)
            start = max(t, ready) + (gap if owner == w.wave else actor_start)
            duration = (r.work_s + r.wait_s) * scale + max(0.0, r.busy - r.work_s - r.wait_s)
            heapq.heappush(free, (start + duration, g, w.wave))
            busy += duration
            work += r.work_s * scale
            first, last = min(first, start), max(last, start + duration)
            launched, ended = max(launched, start), max(ended, start + duration)
        ready = launched if overlap else ended
    span = last - first
    return busy / (gpus * span), work / (gpus * span), span


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def quantile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def print_stage_table(args: argparse.Namespace) -> None:
    models = ["sd14", "sdxl"] if args.model == "mix" else [args.model]
    print(f"Stage times: real seconds on one H200 -> seconds here (/ {args.time_scale:g})")
    for m in models:
        t = STAGES[m]
        rows = [(f"erase {k} (+ eval of the erased model)", v + t.eval) for k, v in sorted(t.erase.items())]
        rows += [("warm-up: load base model + detector, eval", t.warm + t.eval), ("load a cached erasure", t.load)]
        for k, step in sorted(t.ft_step.items()):
            rows.append((f"chunk: {args.eval_every} ft steps ({k}) + eval", args.eval_every * step + t.eval))
        rows += [(f"  of which one evaluation ({EVAL_IMAGES} images)", t.eval)]
        for name, real in rows:
            print(f"  {m:5s} {name:46s} {real:8.1f} s real  {real / args.time_scale:7.2f} s here")


def summarize(
    args: argparse.Namespace,
    waves: list[WaveResult],
    mon: dict[str, Any],
    driver: dict[str, Any],
    cache_stats: dict[str, int],
    campaign: tuple[float, float],
) -> str:
    gpus = args.nodes * args.gpus_per_node
    records = [r for w in waves for r in w.records]
    n = len(records)
    if n == 0:
        return "no trial finished"
    t_first = min(r.t_start for r in records)
    t_last = max(r.t_end for r in records)
    span = t_last - t_first
    busy = sum(r.busy for r in records)
    work = sum(r.work_s for r in records)
    wait = sum(r.wait_s for r in records)
    occ = busy / (gpus * span)
    occ_work = work / (gpus * span)
    lo, hi, peak = steady_window(records)
    steady = hi - lo
    occ_steady = busy_in(records, lo, hi) / (gpus * steady) if steady > 0 else math.nan
    occ_steady_work = busy_in(records, lo, hi, work=True) / (gpus * steady) if steady > 0 else math.nan
    gaps = slot_gaps(records, lo, hi)
    rate = sum(1 for r in records if lo <= r.t_end <= hi) / steady if steady > 0 else math.nan  # trials/s
    gap_mean = statistics.fmean(gaps) if gaps else math.nan
    gaps_all = slot_gaps(records, t_first, t_last)  # also outside the steady window (slow actor starts, churn)
    gap_all = statistics.fmean(gaps_all) if gaps_all else math.nan
    stopped = sum(1 for r in records if r.ft_step < r.steps)
    actors = len({r.pid for r in records})
    warmups = sum(r.warmed for r in records)
    reports = sum(r.reports for r in records)
    erased = sum(r.erased for r in records)
    waited = sum(1 for r in records if r.wait_s > 0)
    driver_cpu = driver["cpu_s"]
    searcher_s = sum(w.searcher_s for w in waves)
    suggests = sum(w.suggests for w in waves)
    errors = sum(w.errors for w in waves)
    exceptions = [w.exception for w in waves if w.exception]
    overhead = (busy - work - wait) / n  # per trial, inside the function but not modelled work: tune.report etc.
    mean_work_real = work / n * args.time_scale
    mean_wait_real = wait / n * args.time_scale
    # Extrapolation to real time: trials are --time-scale times longer; the per-trial fixed costs (gap between
    # trials on a GPU, report round trips) are what they are here, an upper bound since this driver shares 2 cores
    # with 64 actors and 9 raylets and handles results --time-scale times faster than a real campaign needs.
    real_trial = mean_work_real + mean_wait_real + overhead
    real_steady = real_trial / (real_trial + gap_mean)
    real_steady_work = mean_work_real / (real_trial + gap_mean)
    replays = {
        (mode, g): replay(waves, gpus, args.time_scale, g, args.real_actor_start, mode)
        for mode in (True, False)
        for g in (gap_mean, gap_all)
    }
    ideal = work / gpus
    lines = [
        "=== sim_cluster summary ===",
        "command: python benchmarks/sim_cluster.py " + " ".join(shlex.quote(a) for a in driver["argv"]),
        f"cluster: head (0 GPUs, driver) + {args.nodes} nodes x {args.gpus_per_node} logical GPUs = {gpus} GPUs; "
        f"model {args.model}; time scale {args.time_scale:g} (1 s here = {args.time_scale:g} s on real GPUs)",
        f"trials: {n} finished of {args.trials} in {len(waves)} waves of <= {args.wave_size} "
        f"({'overlapped' if args.overlap else 'sequential'}); sampler {args.sampler}; errors {errors}"
        + (f"; wave exceptions: {exceptions}" if exceptions else ""),
        f"ASHA: {stopped} trials stopped early ({pct(stopped / n)}); {reports} reports ({reports / n:.2f} per trial); "
        f"{actors} actors ran trials ({n / actors:.1f} trials per actor, {warmups} warm-ups; --pending "
        f"{args.pending}); {driver['tune_actors']} Tune trial actors created in all",
        f"erasures: {erased} run for {cache_stats.get('erase_configs', '?')} erase configs; {waited} trials waited "
        f"for an erasure in progress ({wait:.1f} s here, {wait * args.time_scale / 3600:.2f} GPU-h real)",
        f"wall: campaign {campaign[1] - campaign[0]:.1f} s (cluster start excluded); first trial start -> last end "
        f"{span:.1f} s; ideal (modelled work / {gpus} GPUs) {ideal:.1f} s",
        f"GPU occupancy (time in trial function): {pct(occ)} overall, {pct(occ_steady)} in the steady window "
        f"({lo - t_first:.0f} s -> {hi - t_first:.0f} s of {span:.0f} s; peak {peak} GPUs busy; {rate:.1f} trials/s)",
        f"GPU occupancy (modelled GPU work only): {pct(occ_work)} overall, {pct(occ_steady_work)} steady",
        f"per-trial costs here: gap between trials on a GPU (steady) mean {gap_mean:.3f} s, median "
        f"{quantile(gaps, 0.5):.3f} s, p95 {quantile(gaps, 0.95):.3f} s (n={len(gaps)}); over the whole run mean "
        f"{gap_all:.3f} s (n={len(gaps_all)}); in-function non-work "
        f"(report round trips) {overhead:.3f} s per trial",
        f"driver: CPU {driver_cpu:.1f} s = {1000 * driver_cpu / n:.1f} ms per trial, {1000 * driver_cpu / reports:.1f}"
        f" ms per report ({pct(driver_cpu / (campaign[1] - campaign[0]))} of one core); searcher "
        f"{1000 * searcher_s / max(suggests, 1):.1f} ms per trial ({searcher_s:.1f} s); peak RSS "
        f"{gib(driver['peak_rss'])}; RSS after each wave: "
        + ", ".join(gib(w.driver_rss) for w in waves)
        + "; Python blocks after each wave (millions): "
        + ", ".join(f"{w.driver_blocks / 1e6:.2f}" for w in waves),
        f"machine: {mon['cores']} cores, {pct(mon['machine_cpu_busy'])} busy over the run (all users); this "
        f"script's processes {mon['tree_cpu_s']:.0f} CPU-s = {mon['tree_cpu_s'] / mon['wall_s']:.2f} cores; peak "
        f"{mon['peak_procs']} processes, {mon['peak_actors']} trial actors alive, {mon['workers_seen']} Ray "
        f"workers seen, RSS sum {gib(mon['peak_rss'])}; lowest available memory {gib(mon['min_available'])}",
        "CPU-s by process kind: " + ", ".join(f"{k} {v:.0f}" for k, v in mon["cpu_by_kind"].items()),
        "per wave (occupancy of all GPUs while the wave ran / during its tail = last launch -> its last end):",
    ]
    for w in waves:
        rs = w.records
        if not rs:
            lines.append(f"  wave {w.wave}: no trial finished")
            continue
        w_lo, w_hi = min(r.t_start for r in rs), max(r.t_end for r in rs)
        occ_w = busy_in(records, w_lo, w_hi) / (gpus * (w_hi - w_lo))
        tail = w_hi - w.last_launch if not math.isnan(w.last_launch) else math.nan
        occ_tail = busy_in(records, w.last_launch, w_hi) / (gpus * tail) if tail > 0 else math.nan
        lines.append(
            f"  wave {w.wave}: fit() at {w.fit_start - t_first:.0f} s, {len(rs)} trials, {w_hi - w_lo:.0f} s "
            f"({w_lo - t_first:.0f}->{w_hi - t_first:.0f}), "
            f"occupancy {pct(occ_w)}, tail {tail:.0f} s at {pct(occ_tail)}; driver RSS {gib(w.driver_rss)}, "
            f"driver CPU so far {w.driver_cpu_s:.0f} s; searcher {1000 * w.searcher_s / max(w.suggests, 1):.1f} "
            "ms/trial"
        )
    bins = timeline(records, gpus, t_first, t_last, 20)
    lines += [
        "occupancy timeline (20 equal bins): " + " ".join(f"{100 * b:.0f}" for b in bins),
        f"real time (x{args.time_scale:g}): campaign {span * args.time_scale / 3600:.1f} h on {gpus} GPUs "
        f"({work * args.time_scale / 3600:.0f} GPU-h of modelled work); mean trial {mean_work_real:.0f} s of work "
        f"+ {mean_wait_real:.1f} s waiting for erasures",
        f"extrapolated to real time, steady state: {pct(real_steady)} (modelled work {pct(real_steady_work)}) "
        f"from a gap of {gap_mean:.3f} s + report overhead {overhead:.3f} s per trial against {real_trial:.0f} s "
        "trials",
        *(
            f"replayed at real durations on {gpus} GPUs, {'overlapped' if mode else 'sequential'} waves, new actor "
            f"{args.real_actor_start:g} s: "
            + "; ".join(
                f"gap {g:.3f} s ({name}): occupancy {pct(o)} (modelled work {pct(ow)}), campaign {sp / 3600:.2f} h"
                for name, g in (("steady", gap_mean), ("whole run", gap_all))
                for o, ow, sp in [replays[(mode, g)]]
            )
            for mode in (True, False)
        ),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=8, help="worker nodes (each a raylet on this machine)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="logical GPUs (and CPUs) per worker node")
    p.add_argument("--trials", type=int, default=10_000, help="trials in the campaign")
    p.add_argument("--wave-size", type=int, default=2500, help="trials per Tuner.fit() wave")
    p.add_argument(
        "--time-scale",
        type=float,
        default=10.0,
        help="real stage seconds per simulated second (10: a 5 s trial here is ~1 min on a GPU; trials this long "
        "let the 2-core machine keep up with 64 GPUs in steady state, ~12 trials/s)",
    )
    p.add_argument("--model", choices=["sd14", "sdxl", "mix"], default="sd14", help="stage times of which model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50, help="fine-tuning steps between evaluations (ASHA's grace)")
    p.add_argument(
        "--sampler",
        choices=["random", "tpe"],
        default="random",
        help="Optuna sampler behind OptunaSearch; TPE's cost per suggestion grows with the study (see docstring)",
    )
    p.add_argument(
        "--overlap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start the next wave's Tuner (in a thread) once this wave has launched its last trial",
    )
    p.add_argument(
        "--pending",
        type=int,
        default=None,
        help="live trials beyond the GPU count, staged so that finished actors are reused (default: the GPU count)",
    )
    p.add_argument(
        "--real-actor-start",
        type=float,
        default=5.0,
        help="seconds a new trial actor takes to start on a real node, for the replay at real durations (estimate: "
        "Python + ray.tune imports take ~1.3 CPU-s here, plus Ray's actor creation)",
    )
    p.add_argument("--object-store-mib", type=int, default=80, help="object store per node (9 nodes share this RAM)")
    p.add_argument("--out", type=Path, default=None, help="also write the summary, waves and trials here (JSON)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (Ray logs, Tune dirs, journal)")
    args = p.parse_args(argv)
    for name in ("nodes", "gpus_per_node", "trials", "wave_size", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.pending is None:
        args.pending = args.nodes * args.gpus_per_node
    if args.pending < 0:
        p.error("--pending must be >= 0")
    if args.time_scale <= 0:
        p.error("--time-scale must be > 0")
    if max(FT_STEPS) % args.eval_every:
        p.error(f"--eval-every must divide the fine-tuning budgets {FT_STEPS}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(args: argparse.Namespace) -> str:
    root = Path(tempfile.mkdtemp(prefix="simc", dir="/tmp"))  # short: Ray's socket paths must stay < 107 chars
    # Before Ray starts: the cluster's processes inherit these. Our own temp dir, so this cluster's address file and
    # sessions never touch another Ray on the machine; no auth token written to ~/.ray.
    os.environ["RAY_TMPDIR"] = str(root)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no per-wave results table (verbose=0 then prints nothing)
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray").setLevel(logging.WARNING)
    # With the auto loggers off, the ResultGrid cannot read metrics back from disk and warns once per trial; the
    # results come from our own callback instead.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    print(f"temporary folder: {root}", flush=True)
    print_stage_table(args)

    cluster = None
    stop_event = threading.Event()
    threads: list[threading.Thread] = []
    try:
        t = time.time()
        cluster, cache = start_cluster(args, root)
        print(f"cluster up in {time.time() - t:.1f} s: {ray.cluster_resources()}", flush=True)
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(root / "study.log")))
        mon = Monitor()
        mon.start()
        cpu0 = cpu_seconds()
        campaign_start = time.time()
        sizes = [min(args.wave_size, args.trials - i) for i in range(0, args.trials, args.wave_size)]
        results: dict[int, WaveResult] = {}

        def runner(k: int, n: int, collector: Any) -> None:
            try:
                results[k] = run_wave(args, k, n, storage, root, stop_event, collector, cpu0)
            finally:
                collector.launched.set()  # never leave the main thread waiting on a wave that failed to launch
            w = results.get(k)
            if w is None:  # run_wave raised before fit(); the traceback is above
                return
            print(
                f"wave {k}: {len(w.records)} trials in {w.fit_end - w.fit_start:.1f} s (fit), driver RSS "
                f"{gib(w.driver_rss)}, driver CPU so far {w.driver_cpu_s:.0f} s"
                + (f", EXCEPTION {w.exception}" if w.exception else ""),
                flush=True,
            )

        for k, n in enumerate(sizes):
            if stop_event.is_set():
                break
            collector = make_collector(k, n)
            th = threading.Thread(target=runner, args=(k, n, collector), name=f"wave{k}", daemon=True)
            th.start()
            threads.append(th)
            if args.overlap:
                while not collector.launched.wait(0.5):  # short waits: Ctrl-C reaches the main thread
                    pass
            else:
                while th.is_alive():
                    th.join(0.5)
        for th in threads:
            while th.is_alive():
                th.join(0.5)
        campaign_end = time.time()
        driver_cpu = cpu_seconds() - cpu0 - mon.thread_cpu
        mon_stats = mon.finish()
        driver = {
            "cpu_s": driver_cpu,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "argv": args.argv,
        }
        cache_stats = ray.get(cache.stats.remote())
        driver["tune_actors"] = count_trial_actors()
        waves = [results[k] for k in sorted(results)]
        summary = summarize(args, waves, mon_stats, driver, cache_stats, (campaign_start, campaign_end))
        print(summary, flush=True)
        if args.out is not None:
            dump = {
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "summary": summary.splitlines(),
                "monitor": mon_stats,
                "waves": [
                    {k: v for k, v in dataclasses.asdict(w).items() if k != "records"} | {"n": len(w.records)}
                    for w in waves
                ],
                "trial_fields": [f.name for f in dataclasses.fields(Record)],
                "trials": [dataclasses.astuple(r) for w in waves for r in w.records],
            }
            args.out.write_text(json.dumps(dump, default=str))
        return summary
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C; SIGTERM arrives as SystemExit (Ray's driver handler)
        print("interrupted: stopping the waves, then Ray and the cluster", flush=True)
        raise
    finally:
        shutdown(cluster, threads, stop_event)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            time.sleep(1)  # dying Ray processes may still write a log file or two
            shutil.rmtree(root, ignore_errors=True)


def shutdown(cluster: Any, threads: list[threading.Thread], stop_event: threading.Event) -> None:
    """Stop the waves (Tune ends its trials), then disconnect the driver, then remove every node. Order matters:
    a Tuner still running after `ray.shutdown()` would connect the driver again, and the cluster refuses to
    remove the head node while a driver is connected to it."""
    import ray

    stop_event.set()
    deadline = time.time() + 60
    for th in threads:
        th.join(max(0.0, deadline - time.time()))
    for _ in range(2):
        ray.shutdown()
        if cluster is None:
            return
        try:
            cluster.shutdown()
            return
        except ValueError:  # a wave thread reconnected the driver meanwhile: disconnect again, retry once
            time.sleep(1)


if __name__ == "__main__":
    main(parse_args())
