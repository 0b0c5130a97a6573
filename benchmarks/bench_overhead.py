"""Orchestrator overhead: the same trials run once as plain function calls in a loop and once through
`resurgence run` (local Ray, Tune, Optuna, MLflow), each in a fresh process; prints the wall-time ratio.

    python benchmarks/bench_overhead.py                    # 8 trials of ~10 s compute each
    python benchmarks/bench_overhead.py --trials 4 --work 2  # a quicker look
    python benchmarks/bench_overhead.py --against f544231  # this tree and that revision, side by side

Both sides pay the same imports and model builds (each is one new process). The loop runs trials one after
another with torch using every core. The orchestrator runs once with one trial at a time on every core (the
same resources as the loop: the ratio is pure overhead) and once with two trials at a time, each on its
share of the cores (Ray sets OMP_NUM_THREADS per trial; the default way to run). Target: ratio <= 1.15 for
trials of >= 10 s. With `--against REV`, the same measurements run for that revision too (a temporary git
worktree) right after this tree's, and their ratios are printed side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from worktree import revision  # noqa: E402


def bench_spec(trials: int, work: int, concurrent: int) -> dict:
    """A fixed trial (no search space: every trial does the same work) scaled by `work`."""
    return {
        "name": "bench-overhead",
        "model": {"name": "tiny-sd"},
        "concept": {"name": "circle", "prompts": ["a circle", "a drawing of a circle"]},
        "others": [{"name": "square", "prompts": ["a square"]}, {"name": "triangle", "prompts": ["a triangle"]}],
        "erase": {"method": "esd", "config": {"iterations": 10 * work, "sample_steps": 10}},
        "finetune": {
            "dataset": {
                "name": "generated",
                "config": {"prompts": ["a square", "a star"], "images_per_prompt": 4, "steps": 10},
            },
            "config": {"steps": 10 * work, "batch_size": 2},
            "eval_every": 5 * work,
        },
        "evaluate": {
            "detector": {"name": "clip", "config": {"model": "tiny-test", "pretrained": None}},
            "config": {"images_per_prompt": 4, "steps": 10},
        },
        "search": {"num_samples": trials, "max_concurrent_trials": concurrent},
        "resources": {"cpu": max(1, (os.cpu_count() or 1) // concurrent)},
    }


LOOP = r"""
import json, sys, time
from pathlib import Path
import yaml
try:
    from orchestrator.resolved import resolve
except ImportError:  # a revision before the resolved trial (bench_overhead.py --against)
    from orchestrator.spec import trial_spec
    def resolve(data):
        return trial_spec(data, {})
from orchestrator.trial import execute_trial
data = yaml.safe_load(Path(sys.argv[1]).read_text())
data["cache_dir"] = str(Path(sys.argv[2]) / "cache")
times = []
for i in range(data["search"]["num_samples"]):
    start = time.perf_counter()
    execute_trial(resolve(data), lambda m: None, Path(sys.argv[2]) / f"trial{i}")
    times.append(time.perf_counter() - start)
print("TRIAL_SECONDS", json.dumps(times))
"""


def timed(cmd: list[str], cwd: Path, env: dict) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return wall, out.stdout


def measure(tree: Path, root: Path, args: argparse.Namespace) -> tuple[float, list[float], dict[int, float]]:
    """The plain loop's wall and per-trial compute, and the orchestrator's wall per concurrency, with `tree`'s code."""
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_USAGE_STATS_ENABLED": "0"}
    spec = root / "loop.yaml"
    spec.write_text(yaml.safe_dump(bench_spec(args.trials, args.work, 1)))
    (root / "loop").mkdir()
    loop_wall, loop_out = timed([sys.executable, "-c", LOOP, str(spec), str(root / "loop")], root / "loop", env)
    per_trial = json.loads(loop_out.split("TRIAL_SECONDS", 1)[1])
    walls = {}
    for n in (int(x) for x in args.concurrent.split(",")):
        spec = root / f"orch{n}.yaml"
        spec.write_text(yaml.safe_dump(bench_spec(args.trials, args.work, n)))
        (root / f"orch{n}").mkdir()
        walls[n], _ = timed([sys.executable, "-m", "orchestrator", "run", str(spec)], root / f"orch{n}", env)
    return loop_wall, per_trial, walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--work", type=int, default=4, help="scales ESD iterations and fine-tuning steps")
    parser.add_argument("--concurrent", default="1,2", help="trials at a time in the orchestrator runs")
    parser.add_argument("--against", default=None, help="another git revision, measured alternately with this tree")
    args = parser.parse_args()

    results: dict[str, tuple[float, list[float], dict[int, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        sides = {"this tree": REPO}
        if args.against:
            sides[args.against] = stack.enter_context(revision(args.against, Path(tmp) / "other"))
        for name, tree in sides.items():
            root = Path(tmp) / f"run-{len(results)}"
            root.mkdir()
            results[name] = measure(tree, root, args)
            print(f"{name}: measured", flush=True)

    print(f"trials: {args.trials}, cores: {os.cpu_count()}")
    for name, (loop_wall, per_trial, walls) in results.items():
        print(f"-- {name}")
        print(
            f"trial compute in the loop: first {per_trial[0]:.1f} s (builds the base model, evaluates it), "
            f"then mean {sum(per_trial[1:]) / max(1, len(per_trial) - 1):.1f} s"
        )
        print(f"plain loop wall:                      {loop_wall:7.1f} s")
        for n, wall in walls.items():
            print(f"orchestrator wall, {n} trial(s) at a time: {wall:7.1f} s   ratio to loop: {wall / loop_wall:.3f}")
    print("target: ratio <= 1.15 for trials of >= 10 s of compute")


if __name__ == "__main__":
    main()
