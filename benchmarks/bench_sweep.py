"""A thousand cheap toy trials through the orchestrator: wall time, overhead against the trials' own
compute, the driver's memory over waves, MLflow write time, and searching the runs afterwards.

    python benchmarks/bench_sweep.py                       # 1,000 trials in waves of 500 (about 100 minutes)
    python benchmarks/bench_sweep.py --trials 40 --wave-size 20 --baseline 6   # a quick look
    python benchmarks/bench_sweep.py --trials 300 --wave-size 300 --steps 10   # smaller trials (one evaluation)

Side by side in one run:
1. **The sweep**: `--trials` trials through `orchestrator.sweep.run_sweep` (local Ray with 2 CPUs, waves
   of Tuner runs over one persistent Optuna study, the erase cache, MLflow in the background). Its
   overhead is counted in core-seconds during the sweep itself: the machine's cores x the sweep's wall,
   against the CPU time the trials spent inside the trial function (`trial_cpu_seconds`); the rest is
   split into idle cores (actor starts, wave boundaries, a wave's last trial running alone), busy
   cores outside trials (the driver, Tune, MLflow, Ray's own processes, workers between trials) and time
   the hypervisor stole (/proc/stat). Measured at the same time as the trials, it does not move with
   this machine's speed, which drifts by tens of percent over minutes (the same trial took 4.8 to 8.4 s
   in one process). Run nothing else meanwhile: /proc/stat counts the whole machine. The overhead is then
   split in two: the floor, what the machine burns with Ray up and no trial to run (its GCS, raylet,
   agents and monitors, the kernel; measured for `--floor-seconds` before the sweep, without Ray's idle
   workers, whose place the trial actors take), a share of the machine whatever the trials are; and the
   rest, a cost per trial that shrinks, as a share, as trials grow. From the two it prints the trial size
   (CPU-s) at which the overhead would be under 5% on this machine.
2. **Baseline**: `--baseline` trials of the same kind as plain `execute_trial` calls in two processes at
   once (one per core, one thread each, as Ray runs trials), before and after the sweep, after a warm-up
   trial that loads the model and fills the erase cache: overhead = sweep wall / (trials x baseline wall
   per trial) - 1, printed too, with both baselines so the drift shows; and the same core-second count for
   the plain calls (2 cores x their wall per trial against their CPU time per trial), which is not zero
   either (the kernel, waiting on files), so the sweep's count less it is what the orchestrator adds outside
   the trials. The baseline draws the trainable subsets in equal shares, as the sweep about does. The trial
   function's CPU per trial, sweep against plain calls subset by subset, is printed too; timed at other
   moments it moves with the machine's drift, so whether trials compute slower inside a sweep is measured
   at the same time by `bench_side_by_side.py` (no sign that they do).

The trial: UCE erases "cross" from the toy model (erased once for the whole sweep: the cache), then
`--steps` (20) steps of fine-tuning on cross-free toy images with the full evaluation (36 images at 10 DDIM
steps) every 10 steps: two rungs for an early stopper after the erased model's own evaluation (step 0).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def bench_spec(trials: int, wave_size: int, steps: int = 20) -> dict[str, Any]:
    base = yaml.safe_load((REPO / "search_spaces" / "toy_resurgence.yaml").read_text())
    return {
        **{k: base[k] for k in ("model", "concept", "others")},
        "name": "bench-sweep",
        "erase": {"method": "uce", "config": {"tokens": "all"}},
        "finetune": {
            "dataset": {"name": "toy", "config": {"n": 216, "exclude": ["cross"], "seed": 1}},
            "config": {"trainable": "xattn", "lr": 5e-4, "steps": steps, "batch_size": 8},
            "eval_every": 10,
        },
        "evaluate": {
            "detector": {"name": "toy"},
            "config": {"images_per_prompt": 1, "steps": 10, "guidance_scale": 3.0},
        },
        "search": {
            "num_samples": trials,
            "wave_size": wave_size,
            "max_concurrent_trials": 2,
            "space": {
                "finetune.config.lr": {"loguniform": [1e-4, 1e-3]},
                "finetune.config.trainable": {"choice": ["full", "xattn", "lora"]},
            },
        },
        "resources": {"cpu": 1},
    }


BASELINE = r"""
import json, sys, time
from pathlib import Path
import torch, yaml
torch.set_num_threads(1)  # as a Ray trial (OMP_NUM_THREADS=1)
from orchestrator.cache import open_cache
from orchestrator.resolved import resolve
from orchestrator.trial import execute_trial
data = json.loads(Path(sys.argv[1]).read_text())
root, n, seed = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
spec0 = resolve(data).spec
cache = open_cache(spec0.storage_path, Path(spec0.cache_dir) / "erased")
import random
rng = random.Random(seed)
TRAINABLE = ["full", "xattn", "lora"]
times, cpus, kinds = [], [], []
for i in range(n + 1):  # trial 0 warms up: loads the model, evaluates the base, erases (or loads the erasure)
    config = {"finetune.config.lr": 10 ** rng.uniform(-4, -3)}
    # the subsets in turn, in equal shares as the sweep draws them (they cost up to 15% apart)
    config["finetune.config.trainable"] = TRAINABLE[(i + seed) % len(TRAINABLE)]
    kinds.append(config["finetune.config.trainable"])
    start, cpu = time.perf_counter(), time.process_time()
    execute_trial(resolve(data, config), lambda m: None, root / f"trial{seed}-{i}", cache)
    times.append(time.perf_counter() - start)
    cpus.append(time.process_time() - cpu)
print("TIMES", json.dumps([times, cpus, kinds]), flush=True)
"""


def run_baseline(
    data: dict[str, Any], root: Path, n: int, warm: bool = True
) -> tuple[float, list[float], list[float], list[str]]:
    """Two processes at once, n timed trials each; returns (wall of the timed part per trial, trial times,
    trial CPU times, each trial's trainable subset)."""
    spec_file = root / "baseline.json"
    spec_file.write_text(json.dumps(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if warm:  # fill the erase cache first, so the two processes time the same thing
        subprocess.run(
            [sys.executable, "-c", BASELINE, str(spec_file), str(root), "0", "99"],
            env=env,
            check=True,
            capture_output=True,
        )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BASELINE, str(spec_file), str(root), str(n), str(s)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for s in (0, 1)
    ]
    times, cpus, kinds = [], [], []
    for p in procs:
        out, _ = p.communicate()
        walls, cpu, kind = json.loads(out.split("TIMES", 1)[1])
        times.append(walls[1:])  # drop each process's warm-up trial
        cpus += cpu[1:]
        kinds += kind[1:]
    timed = [t for ts in times for t in ts]
    # the two processes ran side by side: the wall of the timed part is the slower process's sum
    wall = max(sum(ts) for ts in times)
    return wall / len(timed), timed, cpus, kinds


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def cpu_ticks() -> dict[str, float]:
    """The machine's CPU time so far by state, in core-seconds (/proc/stat's first line)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) / os.sysconf("SC_CLK_TCK") for x in fields)
    return {"busy": user + nice + system + irq + softirq, "idle": idle + iowait, "steal": steal}


def is_trial_worker(cmdline: str) -> bool:
    """A Ray worker process (a trial's actor, or an idle one waiting to become one), not one of Ray's
    agents (`ray::DashboardAgent`, `ray::RuntimeEnvAgent`), which are Ray's own processes."""
    return (cmdline.startswith("ray::") and "Agent" not in cmdline) or "default_worker" in cmdline


class ProcessCPU:
    """CPU seconds of the driver (this process: Tune, the searcher, the MLflow writer thread), of Ray's own
    processes below it (GCS, raylet, agents, monitors) and of its worker processes, from a start. Workers
    come and go (a Tuner's actors end with its wave), so every process is sampled every `every_s` seconds
    and counted at its last sample: a worker loses at most its last `every_s` seconds, spent ending. The
    sampling's own CPU time (`sampler`) is counted apart: it is the benchmark's, not the orchestrator's."""

    def __init__(self, every_s: float = 3.0) -> None:
        import threading

        import psutil

        self.me = psutil.Process()
        self.at_start: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.kinds: dict[int, str] = {}  # pid -> "workers" or "ray" (a command line is read once)
        self.own = 0.0  # the sampling thread's CPU seconds
        self.driver0 = sum(self.me.cpu_times()[:2])
        self._sample(self.at_start)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(every_s,), name="bench-sampler", daemon=True)
        self.thread.start()

    def _sample(self, into: dict | None = None) -> None:
        import psutil

        for child in self.me.children(recursive=True):
            try:
                if child.pid not in self.kinds:
                    self.kinds[child.pid] = "workers" if is_trial_worker(" ".join(child.cmdline())) else "ray"
                times = child.cpu_times()
            except psutil.Error:  # ended meanwhile
                continue
            kind = self.kinds[child.pid]
            if into is not None:
                into[child.pid] = times.user + times.system
            else:
                self.last[child.pid] = (kind, times.user + times.system)

    def _run(self, every_s: float) -> None:
        while not self.stopped.wait(every_s):
            start = time.thread_time()
            self._sample()
            self.own += time.thread_time() - start

    def stop(self) -> dict[str, float]:
        self.stopped.set()
        self.thread.join()
        self._sample()
        driver = sum(self.me.cpu_times()[:2]) - self.driver0 - self.own
        out = {"driver": driver, "ray": 0.0, "workers": 0.0, "sampler": self.own}
        for pid, (kind, cpu) in self.last.items():
            out[kind] += cpu - self.at_start.get(pid, 0.0)
        return out


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of this process's threads, summed by name: the Python threads' own (MainThread runs
    Tune, mlflow-writer MLflow), else the OS's (/proc/self/task/*/comm: Ray's core worker threads)."""
    import threading

    import psutil

    python_names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for t in psutil.Process().threads():
        try:
            name = python_names.get(t.id) or Path(f"/proc/self/task/{t.id}/comm").read_text().strip()
        except OSError:  # a thread that ended meanwhile
            continue
        out[name] = out.get(name, 0.0) + t.user_time + t.system_time
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--wave-size", type=int, default=500)
    parser.add_argument("--baseline", type=int, default=10, help="timed baseline trials per process, before and after")
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps per trial (an evaluation every 10)")
    parser.add_argument("--floor-seconds", type=float, default=30, help="how long to measure the idle Ray first")
    args = parser.parse_args()

    from orchestrator.cli import NO_TELEMETRY, start_local_ray

    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    for name, value in NO_TELEMETRY.items():  # the environment `resurgence run` gives its driver
        os.environ.setdefault(name, value)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    os.chdir(tmp)
    data = bench_spec(args.trials, args.wave_size, args.steps)
    data["storage_path"] = str(tmp / "ray_results")
    data["cache_dir"] = str(tmp / "cache")

    from orchestrator.spec import parse_experiment

    experiment = parse_experiment(data)
    spec = experiment.spec
    print(f"working in {tmp}", flush=True)
    before, times, cpus, kinds = run_baseline(data, tmp, args.baseline)
    print(
        f"baseline before the sweep: {len(times)} trials, two processes at once: {before:.2f} s of wall per trial "
        f"(each trial {sum(times) / len(times):.2f} s on its core, {sum(cpus) / len(cpus):.2f} CPU-s)",
        flush=True,
    )

    import ray

    from orchestrator.store import default_tracking_uri
    from orchestrator.sweep import run_sweep

    start_local_ray(num_cpus=2, configure_logging=False)  # the Ray `resurgence run` starts
    cores = os.cpu_count() or 1
    memory = [("start", rss_mb())]

    threads_at_end: dict[str, float] = {}

    def on_wave(w: int, rows: list) -> None:
        threads_at_end.update(thread_cpu())  # the MLflow writer's thread ends with the sweep
        memory.append((f"after wave {w}", rss_mb()))
        print(f"[bench] wave {w}: {len(rows)} trials, driver RSS {memory[-1][1]:.0f} MiB", flush=True)

    # The floor: what the machine burns with Ray up and nothing to run (its GCS, raylet, agents, monitors;
    # the kernel), per second; it goes on for the whole sweep whatever the trials are.
    time.sleep(5)
    rest0 = cpu_ticks()
    at_rest = ProcessCPU()
    time.sleep(args.floor_seconds)
    resting = at_rest.stop()
    # Ray's idle workers (started ahead for tasks to come) are not counted: the sweep's trial actors take
    # their place (their own wake-ups then count in the trials' CPU time or as workers outside trials).
    idle_workers = resting["workers"] / args.floor_seconds
    busy_at_rest = cpu_ticks()["busy"] - rest0["busy"] - resting["sampler"]
    floor = busy_at_rest / args.floor_seconds - idle_workers  # cores busy at rest
    uri = default_tracking_uri()
    threads0, ticks0, procs, start = thread_cpu(), cpu_ticks(), ProcessCPU(), time.perf_counter()
    outcome = run_sweep(experiment, uri, "bench_sweep", on_wave=on_wave, write_html=False, one_node=True)
    wall, ticks1, by_process = time.perf_counter() - start, cpu_ticks(), procs.stop()
    ray.shutdown()
    after, times_after, cpus_after, kinds_after = run_baseline(data, tmp, args.baseline, warm=False)
    print(
        f"baseline after the sweep: {after:.2f} s of wall per trial ({sum(cpus_after) / len(cpus_after):.2f} CPU-s)",
        flush=True,
    )
    # The same count for the plain calls: the machine's core-seconds per trial against a trial's CPU time.
    plain = cores * (before + after) / 2 / ((sum(cpus) + sum(cpus_after)) / (len(cpus) + len(cpus_after)))
    per_trial = (before + after) / 2

    from mlflow import MlflowClient

    from orchestrator.store import search_all

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(spec.name).experiment_id
    t0 = time.perf_counter()
    runs = search_all(client, exp, f"tags.sweep = '{outcome.run_name}' and tags.stage = 'trial'")
    by_tag = time.perf_counter() - t0
    t0 = time.perf_counter()
    strong = client.search_runs([exp], "tags.stage = 'trial' and metrics.resurgence > 0.5", max_results=1000)
    by_metric = time.perf_counter() - t0

    done = [r for r in outcome.rows if not r["error"]]
    in_trials = sum(r["trial_cpu_seconds"] for r in done)
    available = cores * wall - by_process["sampler"]
    busy, idle, steal = (ticks1[k] - ticks0[k] for k in ("busy", "idle", "steal"))
    busy -= by_process["sampler"]  # the benchmark's own sampling of the processes: not the orchestrator's
    driver, ray_own, workers = (by_process[k] for k in ("driver", "ray", "workers"))
    outside = workers - in_trials  # trial workers outside the trial function
    rest = busy - in_trials - driver - ray_own - outside
    ideal = len(outcome.rows) * per_trial
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("\n=== bench_sweep ===")
    print(
        f"trials: {len(outcome.rows)} ({len(done)} finished) in waves of {args.wave_size}, 2 at a time, {cores} cores"
    )
    print(f"sweep wall: {wall:.0f} s ({wall / len(outcome.rows):.2f} s per trial)")
    print(
        "overhead, core-seconds (measured during the sweep itself, so the machine's drift cancels out): "
        f"{available:.0f} available, {in_trials:.0f} inside trials (their CPU time) -> "
        f"{available / in_trials - 1:+.1%} of the trials' own compute (target < 5%)"
    )
    print(
        f"  of which: idle cores {idle / in_trials:.1%} (actor starts, wave boundaries, the last trial of a wave), "
        f"orchestration CPU {(busy - in_trials) / in_trials:.1%} (driver, Tune, MLflow writes, Ray's processes, "
        f"workers outside trials), stolen by the hypervisor {steal / in_trials:.1%}"
    )
    print(
        f"  orchestration CPU per trial: driver {driver / len(outcome.rows) * 1000:.0f} ms, Ray's own processes "
        f"(GCS, raylet, agents) {ray_own / len(outcome.rows) * 1000:.0f} ms, trial workers outside the trial "
        f"function (starting, importing, Tune's worker loop, idle workers) {outside / len(outcome.rows) * 1000:.0f} "
        f"ms, the rest (the kernel: writeback, page reclaim, its monitors) {rest / len(outcome.rows) * 1000:.0f} ms"
    )
    by_thread = sorted(
        ((threads_at_end[k] - threads0.get(k, 0.0), k) for k in threads_at_end if k != "bench-sampler"), reverse=True
    )
    print(
        "  the driver's CPU per trial by thread, up to the end of the last wave (MainThread: Tune, the searcher, "
        "the callbacks; mlflow-writer: MLflow; the rest: Ray's core worker): "
        + ", ".join(f"{name} {cpu / len(outcome.rows) * 1000:.0f} ms" for cpu, name in by_thread[:6] if cpu > 0)
    )
    # The floor takes floor / cores of every core-second whatever the trials are; what is left is paid per
    # trial, so its share shrinks as trials grow.
    floor_share = floor * wall / in_trials
    per_trial_cost = (available - in_trials - floor * wall) / len(outcome.rows)
    trial_cpu = in_trials / len(done)
    if floor_share < 0.05:
        reach = f"Under 5% in all needs trials of {per_trial_cost / (0.05 - floor_share):.1f} CPU-s or more"
    else:  # a floor read while something else ran on the machine is the usual cause: run nothing else
        reach = "Under 5% in all is out of reach by this floor (is something else running?)"
    print(
        f"  split: the floor (Ray's processes and the kernel with nothing to run, {floor:.1%} of a core, measured "
        f"for {args.floor_seconds:.0f} s before the sweep, Ray's {idle_workers:.1%} in idle workers apart) is "
        f"{floor_share:+.1%} whatever the trials; the rest is "
        f"{per_trial_cost:.2f} core-s per trial, {per_trial_cost / trial_cpu:+.1%} of these {trial_cpu:.1f} CPU-s "
        f"trials. {reach} on this {cores}-core machine"
    )
    print(
        f"overhead vs the plain-call baseline (wall, {before:.2f} s per trial before the sweep and {after:.2f} s "
        f"after; the difference is this machine's drift): {wall / ideal - 1:+.1%}"
    )
    print(
        f"the same core-second count for the plain calls (the machine's core-seconds per trial against a trial's "
        f"CPU time): {plain - 1:+.1%}; the sweep's count less this, what the orchestrator adds in core-seconds: "
        f"{available / in_trials - plain:+.1%}"
    )
    # The trial function's own CPU time, sweep against plain calls, subset by subset: the core-second
    # counts take it as the trials' compute, so a trial that computes slower inside the sweep (the other
    # core busy with the driver and Ray; caches shared) is overhead they do not see.
    plain_by: dict[str, list[float]] = {}
    for kind, cpu in zip(kinds + kinds_after, cpus + cpus_after, strict=True):
        plain_by.setdefault(kind, []).append(cpu)
    swept_by: dict[str, list[float]] = {}
    for r in done:
        swept_by.setdefault(str(r["config"].get("finetune.config.trainable")), []).append(r["trial_cpu_seconds"])
    print(
        "the trial function's CPU per trial, sweep vs plain calls, by trainable subset: "
        + ", ".join(
            f"{k} {mean(swept_by[k]):.2f} vs {mean(plain_by[k]):.2f} CPU-s "
            f"({mean(swept_by[k]) / mean(plain_by[k]) - 1:+.1%}; {len(swept_by[k])} vs {len(plain_by[k])} trials)"
            for k in sorted(plain_by)
            if k in swept_by
        )
    )
    print("driver RSS (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory) + f"; peak {peak:.0f}")
    tr = outcome.tracker
    print(
        f"MLflow writes (background thread): {tr.write_seconds:.1f} s in {tr.calls} batched rounds "
        f"({tr.write_seconds / max(1, len(outcome.rows)) * 1000:.0f} ms per trial); errors: {len(tr.errors)}"
    )
    print(
        f"search_runs by tag: {len(runs)} runs in {by_tag:.2f} s; by metric (resurgence > 0.5): "
        f"{len(strong)} runs in {by_metric:.2f} s"
    )


if __name__ == "__main__":
    main()
