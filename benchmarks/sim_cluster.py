"""A campaign on a simulated GPU cluster, driven by the program `resurgence run` runs: GPU occupancy and driver cost.

The cluster is `ray.cluster_utils.Cluster` on this one machine: a head node with no GPU (the driver's) and `--nodes`
worker nodes that each declare `--gpus-per-node` logical GPUs and as many logical CPUs (nothing runs on a GPU). The
campaign is `orchestrator.sweep.run_sweep` on an experiment spec built here: the project's searcher (one Optuna
study per grid cell, asked and told by CellSearch), its waves of Tuner runs (build_tuner, run_waves), its ledger,
its MLflow callbacks writing every trial to a SQLite store, its erase cache with the lease actor of a multi-node
sweep, and ASHA. Only the trial's function differs (run_sweep's `trial_fn`): `sleeping_trial` reads the trial's
resolved settings as the real trial does and, instead of computing, sleeps for the stage times of SD v1.4 or SDXL
(STAGES: seconds measured on one H200 by benchmarks/gpu_stage_times.py) divided by `--time-scale`: a warm-up on a
fresh worker, the erasure through the real erase cache (produced once per erase config, across all nodes), then
`--eval-every` fine-tuning steps at a time, each followed by an evaluation and a report with a synthetic resurgence.

    python benchmarks/sim_cluster.py                                  # 10,000 trials on 8 x 8 GPUs
    python benchmarks/sim_cluster.py --nodes 2 --gpus-per-node 4 --trials 200 --wave-size 100   # a few minutes
    python benchmarks/sim_cluster.py --model sdxl --time-scale 40     # SDXL's stage times
    python benchmarks/sim_cluster.py --sampler tpe                    # the specs' default sampler

Printed: the stage table, a line per wave, then a summary: wall time; GPU occupancy overall and in the steady window
(from the first to the last moment the most GPUs are busy, without the ramp-up and ramp-down tails); the gap between
trials on a GPU; the driver's CPU per trial (the whole driver process: Tune's loop, the searcher, the ledger, the
MLflow writer) and its memory after each wave; ASHA's early stops; erasures against erase configs.

Occupancy = the sum over trials of the time inside the trial function / (GPUs x the wall time from the first trial's
start to the last trial's end). Figures, with their dates and commands: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ----------------------------------------------------------------------------------------------------------------
# Stage times, in seconds on one GPU (the simulation divides them by --time-scale): measured on one NVIDIA H200 by
# benchmarks/gpu_stage_times.py, this project's code on SD v1.4's and SDXL's architectures, bf16 (docs/benchmarks.md).
# ----------------------------------------------------------------------------------------------------------------
EVAL_IMAGES = 40  # images per evaluation: 20 of the erased concept and 20 of the others, 50 DDIM steps each
CLASSIFY_S = 0.1  # classifying them with a CLIP ViT-L/14 (0.017 s measured, rounded up for the transfers)


@dataclasses.dataclass(frozen=True)
class ModelTimes:
    erase: dict[str, float]  # one erasure by method, writing the erased weights included
    warm: float  # a fresh worker loads the base model and the detector (then evaluates the base model)
    load: float  # a trial whose erasure is cached loads the erased weights
    ft_step: dict[str, float]  # one fine-tuning step (forward, backward, AdamW) by trainable subset
    image: float  # one generated image at the evaluation's batch of 16

    @property
    def eval(self) -> float:
        return EVAL_IMAGES * self.image + CLASSIFY_S


STAGES = {
    # ESD: 1000 iterations (an upper bound: every UNet weight had a gradient in the measured run); UCE: the closed
    # form and writing its 36.6 MiB; MACE: one concept at the official object settings; few-shot: its defaults.
    # Loading a cached erasure: ESD-u's whole UNet at 1 GB/s from shared storage (the upper bound used).
    "sd14": ModelTimes(
        erase={"esd": 1716.0, "uce": 0.5, "mace": 15.0, "fewshot": 6.2},
        warm=3.0,
        load=1.7,
        ft_step={"full": 0.214, "xattn": 0.119, "lora": 0.275, "text_encoder": 0.155},
        image=0.366,
    ),
    "sdxl": ModelTimes(
        erase={"esd": 3593.0, "uce": 1.6, "mace": 48.8, "fewshot": 14.8},
        warm=8.0,
        load=5.1,
        ft_step={"full": 0.559, "xattn": 0.395, "lora": 0.830, "text_encoder": 0.406},
        image=2.081,
    ),
}
FT_STEPS = [100, 200, 300]  # fine-tuning budgets searched (docs/background.md §3)
LR_RANGE = [1e-6, 1e-4]  # docs/background.md §3
SIM_ENV = "SIM_CLUSTER"  # the simulation's settings, in the environment of every node's processes
_WORKER: dict[str, Any] = {}  # per trial-actor process: the model it has warm


# ----------------------------------------------------------------------------------------------------------------
# The trial (runs in a Ray worker, in place of orchestrator/trainable.py's)
# ----------------------------------------------------------------------------------------------------------------
def synthetic_resurgence(method: str, trainable: str, lr: float, step: int, rng: random.Random) -> float:
    """A made-up resurgence curve with an optimum in the space, so that the searcher and ASHA have something to
    rank: best near lr 3e-5, full fine-tuning above LoRA/xattn above the text encoder, plus noise."""
    lr_fit = math.exp(-((math.log10(lr) + 4.5) ** 2) / (2 * 0.6**2))
    gain = {"full": 0.9, "xattn": 0.7, "lora": 0.6, "text_encoder": 0.4}[trainable]
    hold = {"esd": 0.5, "uce": 0.3, "mace": 0.6, "fewshot": 0.2}[method]
    speed = 1.0 - math.exp(-step * lr / 2e-3)
    return gain * lr_fit * (1.0 - 0.5 * hold) * speed + rng.gauss(0.0, 0.03)


def sleeping_trial(config: dict[str, Any], lease_actor: str | None = None) -> None:
    """A Tune trial of the sweep: the stages of orchestrator/trial.py as sleeps, the erasure through the erase cache."""
    import ray
    from ray import tune

    from orchestrator.cache import content_key
    from orchestrator.resolved import RESOLVED_KEY
    from orchestrator.trial import worker_cache

    t_start, work = time.time(), 0.0
    sim = json.loads(os.environ[SIM_ENV])
    times, scale = STAGES[sim["model"]], sim["time_scale"]
    trial = config[RESOLVED_KEY]
    method, ft = trial.spec.erase.method, trial.components.finetune

    def work_for(real_seconds: float) -> None:
        nonlocal work
        time.sleep(real_seconds / scale)
        work += real_seconds / scale

    warmed = _WORKER.get("warm") != sim["model"]
    if warmed:  # a fresh worker: load the base model and the detector, evaluate the base model
        work_for(times.warm + times.eval)
        _WORKER["warm"] = sim["model"]

    def erase(folder: Path) -> None:
        work_for(times.erase[method] + times.eval)
        (folder / "erased.json").write_text("{}")

    got = worker_cache(trial, lease_actor).get(content_key("erased", trial.erase_content()), erase)
    if got.status == "hit":
        work_for(times.load)
    gpu = f"{ray.get_runtime_context().get_node_id()[:12]}/{','.join(map(str, ray.get_gpu_ids()))}"
    rng = random.Random(zlib.crc32(trial.slot.encode()))
    record = {"trial": trial.slot, "t_start": t_start, "gpu": gpu, "pid": os.getpid(), "steps": ft.steps}
    record |= {"erased": int(got.status == "miss"), "warmed": int(warmed)}

    def report(step: int, resurgence: float) -> None:
        record.update(t_end=time.time(), work_s=work, ft_step=step)
        with open(sim["records"], "a") as f:  # one machine: every node writes here (ASHA may stop any trial)
            f.write(json.dumps(record) + "\n")
        presence = 0.1 + max(0.0, resurgence)
        tune.report({"ft_step": step, "presence": presence, "resurgence": resurgence, "retention": 0.9})

    report(0, 0.0)
    chunk = trial.spec.finetune.eval_every
    for step in range(chunk, ft.steps + 1, chunk):
        work_for(chunk * times.ft_step[ft.trainable] + times.eval)
        report(step, synthetic_resurgence(method, ft.trainable, ft.lr, step, rng))


# ----------------------------------------------------------------------------------------------------------------
# The campaign (the driver)
# ----------------------------------------------------------------------------------------------------------------
def campaign_spec(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """The experiment spec the campaign runs: one grid cell per erasure method, each with its own study."""
    methods = sorted(STAGES["sd14"].erase)
    return {
        "name": "sim_cluster",
        "model": {"name": "tiny-sd", "config": {"seed": 0}},  # validated, never loaded: the stage table stands in
        "concept": {"name": "circle", "prompts": ["a circle"]},
        "others": [{"name": "square", "prompts": ["a square"]}],
        "erase": {"method": "uce"},
        "finetune": {
            "dataset": {"name": "generated", "config": {"prompts": ["a square"]}},
            "config": {"steps": FT_STEPS[0]},
            "eval_every": args.eval_every,
        },
        "evaluate": {"detector": {"name": "clip", "config": {"model": "tiny-test", "pretrained": None}}},
        "search": {
            "num_samples": math.ceil(args.trials / len(methods)),
            "seed": args.seed,
            "algorithm": args.sampler,
            "wave_size": args.wave_size,
            "space": {
                "erase.method": {"grid": methods},
                "finetune.config.lr": {"loguniform": LR_RANGE},
                "finetune.config.steps": {"choice": FT_STEPS},
                "finetune.config.trainable": {"choice": sorted(STAGES["sd14"].ft_step)},
            },
            "scheduler": {"name": "asha", "grace_period": args.eval_every},
        },
        "resources": {"cpu": 1, "gpu": 1},
        "storage_path": str(root / "ray_results"),
        "cache_dir": str(root / "cache"),
    }


def start_cluster(args: argparse.Namespace, root: Path) -> Any:
    """A head node (no GPU: the driver, the lease actor) and the worker nodes, all on this machine."""
    import ray
    from ray.cluster_utils import Cluster

    store = args.object_store_mib * 1024**2
    head = {"num_cpus": 1, "num_gpus": 0, "object_store_memory": store, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={**head, "temp_dir": str(root / "ray")})
    for _ in range(args.nodes):
        n = args.gpus_per_node  # logical CPUs: one per trial (this machine has far fewer cores)
        cluster.add_node(num_cpus=n, num_gpus=n, object_store_memory=store, temp_dir=str(root / "ray"))
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
    return cluster


@dataclasses.dataclass
class Trial:
    """A trial as its last report left it."""

    t_start: float
    t_end: float
    work_s: float
    gpu: str
    pid: int
    steps: int
    ft_step: int
    erased: int
    warmed: int

    @property
    def busy(self) -> float:
        return self.t_end - self.t_start


def read_trials(path: Path) -> list[Trial]:
    last: dict[str, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            last[r["trial"]] = r
    fields = [f.name for f in dataclasses.fields(Trial)]
    return [Trial(**{k: r[k] for k in fields}) for r in last.values()]


def busy_in(trials: list[Trial], lo: float, hi: float) -> float:
    """GPU-busy seconds inside [lo, hi]."""
    return sum(max(0.0, min(t.t_end, hi) - max(t.t_start, lo)) for t in trials)


def steady_window(trials: list[Trial]) -> tuple[float, float, int]:
    """From the first moment the most GPUs are busy to the last; and that count."""
    events = sorted([(t.t_start, 1) for t in trials] + [(t.t_end, -1) for t in trials])
    running = peak = 0
    for _, d in events:
        running += d
        peak = max(peak, running)
    running, first, end = 0, math.nan, math.nan
    for moment, d in events:
        running += d
        if running == peak and d == 1 and math.isnan(first):
            first = moment
        if running == peak - 1 and d == -1:
            end = moment
    return first, end, peak


def gpu_gaps(trials: list[Trial], lo: float, hi: float) -> list[float]:
    """Idle time between consecutive trials on the same GPU inside [lo, hi]."""
    by_gpu: dict[str, list[Trial]] = defaultdict(list)
    for t in trials:
        by_gpu[t.gpu].append(t)
    gaps = []
    for ts in by_gpu.values():
        ts.sort(key=lambda t: t.t_start)
        gaps += [
            max(0.0, b.t_start - a.t_end) for a, b in zip(ts, ts[1:], strict=False) if a.t_end >= lo and b.t_start <= hi
        ]
    return gaps


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def print_stage_table(args: argparse.Namespace) -> None:
    t = STAGES[args.model]
    print(f"Stage times of {args.model}: real seconds on one H200 -> seconds here (/ {args.time_scale:g})")
    rows = [(f"erase {k} (+ evaluation of the erased model)", v + t.eval) for k, v in sorted(t.erase.items())]
    rows += [("warm-up: base model + detector, evaluation", t.warm + t.eval), ("load a cached erasure", t.load)]
    rows += [
        (f"{args.eval_every} fine-tuning steps ({k}) + evaluation", args.eval_every * s + t.eval)
        for k, s in sorted(t.ft_step.items())
    ]
    for name, real in rows:
        print(f"  {name:48s} {real:8.1f} s real  {real / args.time_scale:7.2f} s here")


def summary(
    args: argparse.Namespace, trials: list[Trial], waves: list[tuple[int, float]], driver_cpu: float, wall: float
) -> str:
    gpus = args.nodes * args.gpus_per_node
    n = len(trials)
    first, last = min(t.t_start for t in trials), max(t.t_end for t in trials)
    span = last - first
    lo, hi, peak = steady_window(trials)
    steady = hi - lo
    gaps = gpu_gaps(trials, lo, hi)
    stopped = sum(t.ft_step < t.steps for t in trials)
    lines = [
        "=== sim_cluster summary ===",
        "command: python benchmarks/sim_cluster.py " + " ".join(args.argv),
        f"cluster: head (no GPU: the driver) + {args.nodes} nodes x {args.gpus_per_node} logical GPUs = {gpus} GPUs; "
        f"stage times of {args.model} / {args.time_scale:g}; sampler {args.sampler}; waves of {args.wave_size}",
        f"trials: {n} ran; ASHA stopped {stopped} early ({pct(stopped / n)}); {len({t.pid for t in trials})} worker "
        f"processes ran trials, {sum(t.warmed for t in trials)} warm-ups; {sum(t.erased for t in trials)} erasures "
        f"for {len(STAGES[args.model].erase)} erase configs",
        f"wall: run_sweep {wall:.0f} s; first trial start -> last end {span:.0f} s; ideal (modelled work / {gpus} "
        f"GPUs) {sum(t.work_s for t in trials) / gpus:.0f} s",
        f"GPU occupancy: {pct(sum(t.busy for t in trials) / (gpus * span))} overall, "
        f"{pct(busy_in(trials, lo, hi) / (gpus * steady)) if steady > 0 else 'n/a'} in the steady window "
        f"({lo - first:.0f} s -> {hi - first:.0f} s, peak {peak} GPUs busy)",
        f"gap between trials on a GPU (steady window): mean {statistics.fmean(gaps) if gaps else math.nan:.3f} s, "
        f"median {statistics.median(gaps) if gaps else math.nan:.3f} s (n={len(gaps)})",
        f"driver: {driver_cpu:.0f} CPU-s = {1000 * driver_cpu / n:.1f} ms per trial ({pct(driver_cpu / wall)} of a "
        f"core); peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:.2f} GiB; RSS after each "
        "wave: " + ", ".join(f"{rss:.2f}" for _, rss in waves) + " GiB",
    ]
    return "\n".join(lines)


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**3


def main(args: argparse.Namespace) -> str:
    root = Path(tempfile.mkdtemp(prefix="simc", dir="/tmp"))  # short: Ray's socket paths must stay < 107 chars
    records = root / "trials.jsonl"
    # Before Ray starts: every node's processes inherit these (Ray's session under root, no auth token in ~/.ray).
    os.environ[SIM_ENV] = json.dumps({"model": args.model, "time_scale": args.time_scale, "records": str(records)})
    os.environ["RAY_TMPDIR"] = str(root)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import optuna
    import ray

    from orchestrator.spec import parse_experiment
    from orchestrator.sweep import run_sweep

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"temporary folder: {root}", flush=True)
    print_stage_table(args)
    experiment = parse_experiment(campaign_spec(args, root))
    cluster = None
    try:
        cluster = start_cluster(args, root)
        print(f"cluster: {ray.cluster_resources()}", flush=True)
        waves: list[tuple[int, float]] = []

        def on_wave(w: int, rows: list) -> None:
            waves.append((len(rows), rss_gib()))
            free = ray.available_resources().get("GPU", 0)
            print(f"wave {w}: {len(rows)} trials; driver RSS {waves[-1][1]:.2f} GiB; {free:g} GPUs free", flush=True)

        cpu0, start = time.process_time(), time.perf_counter()
        outcome = run_sweep(
            experiment,
            f"sqlite:///{root / 'mlflow.db'}",
            "sim_cluster",
            on_wave=on_wave,
            trial_fn=sleeping_trial,
            write_html=False,
        )
        wall, driver_cpu = time.perf_counter() - start, time.process_time() - cpu0
        if not outcome.ok:
            raise RuntimeError("no trial finished")
        text = summary(args, read_trials(records), waves, driver_cpu, wall)
        print(text, flush=True)
        return text
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=8, help="worker nodes (each a raylet on this machine)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="logical GPUs (and CPUs) per worker node")
    p.add_argument("--trials", type=int, default=10_000, help="trials in the campaign (rounded up to the 4 cells)")
    p.add_argument("--wave-size", type=int, default=2500, help="trials per Tuner run (search.wave_size)")
    p.add_argument("--time-scale", type=float, default=10.0, help="real stage seconds per simulated second")
    p.add_argument("--model", choices=sorted(STAGES), default="sd14", help="whose stage times")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=50, help="fine-tuning steps between evaluations (ASHA's grace)")
    p.add_argument("--sampler", choices=["random", "tpe"], default="random", help="search.algorithm")
    p.add_argument("--object-store-mib", type=int, default=80, help="object store per node (the nodes share RAM)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (Ray logs, ledger, MLflow store)")
    args = p.parse_args(argv)
    for name in ("nodes", "gpus_per_node", "trials", "wave_size", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.time_scale <= 0:
        p.error("--time-scale must be > 0")
    if any(steps % args.eval_every for steps in FT_STEPS):
        p.error(f"--eval-every must divide the fine-tuning budgets {FT_STEPS}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


if __name__ == "__main__":
    main(parse_args())
