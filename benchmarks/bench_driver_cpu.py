"""The driver's CPU per trial, this tree against another revision, side by side in one run.

    python benchmarks/bench_driver_cpu.py --against 99c32b4          # 60 toy trials, 2 waves, 2 rounds each
    python benchmarks/bench_driver_cpu.py --against HEAD~3 --trials 20 --rounds 1   # a quick look

Each round runs the same toy sweep (bench_sweep.py's trial: UCE erased once, a few fine-tuning steps, the
full evaluation) through `resurgence run` on a local Ray with 2 CPUs, once with this tree's code and once
with the other revision's (checked out into a temporary git worktree), alternating, so the machine's drift
hits both alike. What is counted is the driver process's own CPU time (every thread: Tune's loop, the
searcher and its Optuna journal, the ledger, the MLflow writer) inside `run_sweep`, divided by the number
of trials; Ray's daemons and the trial workers are other processes and are not counted. Both sides write
Tune's experiment state on the same clock (every 60 s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_sweep import bench_spec  # noqa: E402
from worktree import revision  # noqa: E402

# Runs `resurgence run` in-process with run_sweep wrapped: prints the driver's CPU inside it as JSON.
DRIVER = """
import json, sys, time
import orchestrator.sweep as sweep
inner = sweep.run_sweep
def timed(*args, **kwargs):
    start = time.process_time()
    try:
        return inner(*args, **kwargs)
    finally:
        print("DRIVER_CPU " + json.dumps({"cpu_s": time.process_time() - start}), flush=True)
sweep.run_sweep = timed
from orchestrator.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_once(tree: Path, spec: Path, workdir: Path) -> float:
    workdir.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, "run", str(spec), "--num-cpus", "2", "--new"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("DRIVER_CPU ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"bench_driver_cpu: the sweep failed in {tree}:\n{(out.stdout + out.stderr)[-3000:]}")
    return json.loads(lines[-1].removeprefix("DRIVER_CPU "))["cpu_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="the other git revision (e.g. the last release)")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--wave-size", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10, help="fine-tuning steps per trial (an evaluation every 10)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    args = parser.parse_args()
    if args.trials < 2 or args.rounds < 1 or args.steps < 10:
        parser.error("--trials >= 2, --rounds >= 1, --steps >= 10")
    with tempfile.TemporaryDirectory(prefix="bench-driver-") as tmp:
        with revision(args.against, Path(tmp) / "other") as other:
            spec = Path(tmp) / "spec.yaml"
            spec.write_text(yaml.safe_dump(bench_spec(args.trials, args.wave_size, args.steps)))
            sides = {"this tree": REPO, f"{args.against}": other}
            cpu: dict[str, list[float]] = {name: [] for name in sides}
            for r in range(args.rounds):
                for name, tree in sides.items() if r % 2 == 0 else reversed(sides.items()):
                    seconds = run_once(tree, spec, Path(tmp) / f"{r}-{len(cpu[name])}-{tree.name}")
                    cpu[name].append(seconds)
                    per_trial = 1000 * seconds / args.trials
                    print(f"round {r + 1}, {name}: driver {seconds:.1f} CPU-s, {per_trial:.0f} ms/trial", flush=True)
    print(f"\nDriver CPU inside run_sweep per trial ({args.trials} trials, waves of {args.wave_size}):")
    for name, values in cpu.items():
        per = [1000 * v / args.trials for v in values]
        print(f"  {name:>12}: {mean(per):.0f} ms  (runs: {', '.join(f'{p:.0f}' for p in per)})")
    a, b = (mean(v) for v in cpu.values())
    print(f"  ratio this tree / {args.against}: {a / b:.3f}")


if __name__ == "__main__":
    main()
