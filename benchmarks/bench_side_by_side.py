"""Do trials compute slower inside a sweep than as plain calls? Both at the same time, so that this machine's
drift (the same trial takes 10.7 CPU-s one half hour and 15.5 the next) hits both alike.

    python benchmarks/bench_side_by_side.py            # 12 trials each (about 4 minutes)
    python benchmarks/bench_side_by_side.py --trials 24

A sweep runs one trial at a time through the orchestrator (a local Ray with 1 CPU: Tune, the erase cache,
MLflow in the background, the driver and Ray's processes all running), while a plain process runs the same
kind of trials as `execute_trial` calls on the other core. It prints the trial function's CPU time per
trial, sweep against plain calls, subset by subset. Comparing a sweep with plain calls timed before and
after it (what `bench_sweep.py` does) cannot tell a slower trial from a slower machine.
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

from bench_sweep import BASELINE, REPO, bench_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=12, help="trials in the sweep and in the plain process each")
    args = parser.parse_args()

    from orchestrator.cli import NO_TELEMETRY, start_local_ray

    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    for name, value in NO_TELEMETRY.items():
        os.environ.setdefault(name, value)
    tmp = Path(tempfile.mkdtemp(prefix="side-by-side-"))
    os.chdir(tmp)
    data = bench_spec(args.trials, args.trials)
    data["search"]["max_concurrent_trials"] = 1
    data["storage_path"], data["cache_dir"] = str(tmp / "ray_results"), str(tmp / "cache")
    spec_file = tmp / "spec.json"
    spec_file.write_text(json.dumps(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    plain_cmd = [sys.executable, "-c", BASELINE, str(spec_file), str(tmp)]
    # Fill the erase cache first (its warm-up trial), so that both sides time the same thing.
    subprocess.run([*plain_cmd, "0", "99"], env=env, check=True, capture_output=True)

    from orchestrator.spec import parse_experiment
    from orchestrator.store import default_tracking_uri
    from orchestrator.sweep import run_sweep

    start_local_ray(num_cpus=1, configure_logging=False)
    # A few more plain trials than the sweep's, so the plain process is still busy when the sweep ends.
    plain = subprocess.Popen(
        [*plain_cmd, str(args.trials + 3), "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    outcome = run_sweep(parse_experiment(data), default_tracking_uri(), "side_by_side", write_html=False, one_node=True)
    _, cpus, kinds = json.loads(plain.communicate()[0].split("TIMES", 1)[1])

    by_subset: dict[str, tuple[list[float], list[float]]] = {}
    for cpu, kind in zip(cpus[1:], kinds[1:], strict=True):  # each process's first trial warms up
        by_subset.setdefault(kind, ([], []))[1].append(cpu)
    for row in outcome.rows:
        if not row["error"]:
            kind = str(row["config"].get("finetune.config.trainable"))
            by_subset.setdefault(kind, ([], []))[0].append(row["trial_cpu_seconds"])
    print("\n=== bench_side_by_side: the trial function's CPU per trial, at the same time ===")
    swept_all, plain_all = [], []
    for kind, (swept, plain_cpus) in sorted(by_subset.items()):
        if swept and plain_cpus:
            swept_all += [mean(swept)] * len(swept)
            plain_all += [mean(plain_cpus)] * len(swept)  # weighted by the sweep's mix
            print(
                f"{kind}: sweep {mean(swept):.2f} CPU-s ({len(swept)} trials) vs plain {mean(plain_cpus):.2f} "
                f"({len(plain_cpus)}): {mean(swept) / mean(plain_cpus) - 1:+.1%}"
            )
    if swept_all:
        print(f"all, in the sweep's mix of subsets: {mean(swept_all) / mean(plain_all) - 1:+.1%}")


if __name__ == "__main__":
    main()
