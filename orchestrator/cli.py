"""The `resurgence` command (also `python -m orchestrator`).

    resurgence run search_spaces/smoke.yaml            # a local Ray, an Optuna-driven Tune sweep, MLflow
    resurgence run SPEC --address auto                 # on a running Ray cluster
    resurgence run SPEC --num-cpus 2                   # a local Ray with 2 CPUs (re-running continues an
                                                       # unfinished sweep of the same spec; --new starts anew)
    resurgence resume [SWEEP]                          # continue a sweep whose driver stopped
    resurgence report EXPERIMENT [--sweep NAME]        # Parquet table, plots, HTML page of a sweep (from MLflow)
    resurgence validate SPEC                           # check a spec; computes nothing
    resurgence list                                    # registered methods, models, datasets, detectors
    resurgence toy train-detector                      # retrain the committed toy detector (seed 0)

Bad input (spec, flags, paths) ends with a one-line error naming the field and exit code 2, before Ray
starts and before any MLflow run exists.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only light imports here: `resurgence report`, `--help` and a bad flag must not pay for torch and the methods
# (orchestrator.spec loads every component); each command imports what it needs.
from orchestrator.errors import SpecError
from orchestrator.formatting import first_line
from orchestrator.ray_internals import RayVersionError

if TYPE_CHECKING:
    from orchestrator.spec import Experiment, ExperimentSpec

EXIT_BAD_INPUT = 2

# Usage telemetry of the libraries the driver runs, off unless the user's environment says otherwise: the
# driver makes no outbound calls of its own, and MLflow's per-call telemetry wrapper costs CPU on every write.
# Ray reads its variable at ray.init, MLflow at every call, and Ray passes the driver's environment to the
# local cluster's processes.
NO_TELEMETRY = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}

# The driver's own local Ray runs on the same cores as its trials, so its daemons' polling is overhead on
# every trial: the log monitor re-lists its log folder every 0.1 s (with under 1,000 files there; every 5 s
# with these settings), the dashboard agent samples every process's CPU every 5 s (every 60 s), and every
# process exports metrics nobody scrapes (off). Ray's processes read them from the driver's environment at
# ray.init; a cluster that `ray start` started keeps its own settings. The user's environment wins.
QUIET_LOCAL_RAY = {
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "5",
    "REPORTER_UPDATE_INTERVAL_MS": "60000",
    "RAY_enable_metrics_collection": "false",
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="resurgence", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the sweep an experiment spec describes")
    run.add_argument("spec", help="experiment YAML (see search_spaces/)")
    run.add_argument("--smoke-test", action="store_true", help="apply the spec's `smoke` overrides (tiny run)")
    run.add_argument("--num-samples", type=_positive_int, help="number of trials (overrides search.num_samples)")
    run.add_argument("--address", help="Ray cluster address (e.g. auto or ray://host:10001); default: local Ray")
    run.add_argument("--num-cpus", type=_positive_int, help="CPUs of the local Ray (default: all of them)")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
    run.add_argument("--storage-path", help="where Tune keeps results (overrides storage_path)")
    run.add_argument("--new", action="store_true", help="start a new sweep even if one of this spec did not finish")

    resume = sub.add_parser("resume", help="continue a sweep whose driver stopped (killed, crashed, machine lost)")
    resume.add_argument("sweep", nargs="?", help="the sweep's name or folder (default: the newest unfinished one)")
    resume.add_argument("--storage-path", help="where to look for sweeps (default: ray_results)")
    resume.add_argument("--address", help="Ray cluster address (e.g. auto); default: local Ray")
    resume.add_argument("--num-cpus", type=_positive_int, help="CPUs of the local Ray (default: all of them)")
    resume.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the sweep used)")

    report = sub.add_parser("report", help="write a sweep's Parquet table, plots and HTML page (from MLflow)")
    report.add_argument("experiment", help="the MLflow experiment (the spec's name)")
    report.add_argument("--sweep", help="the sweep's run name (default: the latest sweep of the experiment)")
    report.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
    report.add_argument("--out", help="output folder (default: reports/<sweep>)")

    validate = sub.add_parser("validate", help="check a spec without computing anything")
    validate.add_argument("spec")
    validate.add_argument("--smoke-test", action="store_true", help="check the spec with its `smoke` overrides applied")
    sub.add_parser("list", help="list registered methods, models, datasets and detectors")

    toy = sub.add_parser("toy", help="build the toy world's committed parts")
    toy_sub = toy.add_subparsers(dest="toy_command", required=True)
    det = toy_sub.add_parser("train-detector", help="train the toy detector and save it as safetensors")
    det.add_argument("--out", default=None, help="output file (default: the committed methods/toyworld/assets file)")
    det.add_argument("--steps", type=_positive_int, default=600, help="optimizer steps (default 600)")
    det.add_argument("--seed", type=int, default=0)
    tm = toy_sub.add_parser("train-model", help="train the toy text-to-image model and save it (diffusers folder)")
    tm.add_argument(
        "--out", default=None, help="output folder (default: the committed methods/toyworld/assets/toy_model)"
    )
    tm.add_argument("--steps", type=_positive_int, default=3500, help="optimizer steps (default 3500)")
    tm.add_argument("--seed", type=int, default=0)
    tm.add_argument("--check-every", type=_positive_int, default=500, help="steps between prompt-following checks")
    args = parser.parse_args(argv)
    if args.command in ("run", "resume"):
        # `ray job submit` gives its entrypoint the cluster's address in RAY_ADDRESS, and ray.init would follow
        # it: a driver started there without --address runs on that cluster, so it is treated as one.
        args.address_field = "--address"
        if not args.address and os.environ.get("RAY_ADDRESS"):
            args.address, args.address_field = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
    return args


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def prepare(args: argparse.Namespace) -> tuple[Experiment, str]:
    """Everything checked before compute: the spec with CLI overrides (parsed once), paths, the tracking URI."""
    from orchestrator.paths import is_remote, storage_location
    from orchestrator.spec import (
        Experiment,
        ExperimentSpec,
        apply_overrides,
        parse_experiment,
        read_spec,
        smoke_overrides,
    )
    from orchestrator.store import check_tracking_uri, default_tracking_uri

    data = read_spec(args.spec)
    overrides: dict[str, Any] = dict(smoke_overrides(data)) if args.smoke_test else {}
    if args.num_samples is not None:
        overrides["search.num_samples"] = args.num_samples
    if args.storage_path is not None:
        overrides["storage_path"] = args.storage_path
    data = apply_overrides(data, overrides)
    # Trials run in other processes (and, on a cluster, other machines): pass absolute paths. The storage
    # may also be a URI (s3://, gs://, ...) that pyarrow's filesystems open.
    for key, absolute in (("storage_path", storage_location), ("cache_dir", _absolute)):
        value = data.get(key, ExperimentSpec.model_fields[key].default)
        if isinstance(value, str):  # anything else: the spec's validation names it
            data[key] = absolute(value)
    experiment = parse_experiment(data, check_smoke=not args.smoke_test)  # the smoke test's spec is this one
    spec = experiment.spec
    if spec.distributed is not None:  # trials on other nodes get the DeepSpeed config itself, not a path
        inline = spec.distributed.model_copy(update={"deepspeed": experiment.components.deepspeed})
        data["distributed"] = {**data["distributed"], "deepspeed": experiment.components.deepspeed}
        spec = spec.model_copy(update={"distributed": inline})
        experiment = Experiment(spec, data, experiment.components)
    if is_remote(spec.storage_path):
        from pyarrow import fs

        try:
            fs.FileSystem.from_uri(spec.storage_path)
        except (ValueError, OSError) as err:
            raise SpecError(f"storage_path: cannot open {spec.storage_path} ({first_line(err)})") from None
    for field in ("cache_dir",) if is_remote(spec.storage_path) else ("storage_path", "cache_dir"):
        try:
            os.makedirs(getattr(spec, field), exist_ok=True)
        except OSError as err:
            raise SpecError(f"{field}: cannot create {getattr(spec, field)} ({err.strerror})") from None
    check_resources(spec, args)
    uri = check_tracking_uri(args.tracking_uri or default_tracking_uri())
    return experiment, uri


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def check_resources(spec: ExperimentSpec, args: argparse.Namespace) -> None:
    """The Ray flags against what a trial needs (a trial that can never be placed would wait forever)."""
    from orchestrator.search import DRIVER_CPU

    if args.address and args.num_cpus:
        where = "with --address" if args.address_field == "--address" else "when RAY_ADDRESS names a cluster"
        raise SpecError(f"--num-cpus: sizes a local Ray only; a cluster's CPUs are its own (drop it {where})")
    workers = spec.distributed.workers if spec.distributed is not None else 1  # a trial's processes
    need = spec.resources.cpu * workers + (DRIVER_CPU if spec.distributed is not None else 0)
    if need > (args.num_cpus or os.cpu_count() or 1) and not args.address:
        raise SpecError(
            f"resources.cpu: a trial asks for {need:g} CPUs ({workers} worker(s)) but the local Ray has "
            f"{args.num_cpus or os.cpu_count()} (a trial would never start)"
        )
    if spec.resources.gpu > 0 and not args.address:
        import torch

        if torch.cuda.device_count() < spec.resources.gpu * workers:
            raise SpecError(
                f"resources.gpu: trials ask for {spec.resources.gpu * workers:g} GPU(s) but this machine has "
                f"{torch.cuda.device_count()} (pass --address for a cluster)"
            )


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.resume import SweepState, check_resumable, unfinished_sweeps

    experiment, uri = prepare(args)
    warn(experiment.warnings())
    resume = None
    found = [] if args.new else unfinished_sweeps(sweep_base(experiment.spec), experiment.data)
    if found:
        resume = SweepState.load(found[0])
        check_resumable(found[0], resume, anew="pass --new to start a new sweep (its folder is left as it is)")
        print(
            f"resurgence: continuing sweep {resume.run_name} of this spec (started {resume.started}; its driver "
            "stopped before the end). Pass --new for a new sweep.",
            flush=True,
        )
    return drive(experiment, uri, args.spec, args, resume)


def cmd_resume(args: argparse.Namespace) -> int:
    from orchestrator.resume import DriverLock, SweepState, check_resumable, unfinished_sweeps
    from orchestrator.spec import parse_experiment
    from orchestrator.store import check_tracking_uri

    base = Path(os.path.abspath(os.path.expanduser(args.storage_path or "ray_results")))
    if args.sweep and (Path(args.sweep) / "sweep.json").is_file():
        folder = Path(args.sweep).resolve()
    elif args.sweep:
        folder = base / args.sweep
        if not (folder / "sweep.json").is_file():
            raise SpecError(f"sweep: no sweep {args.sweep!r} under {base} (pass its folder, or --storage-path)")
    else:
        found = unfinished_sweeps(base)
        if not found:
            raise SpecError(f"sweep: no unfinished sweep under {base} (pass --storage-path to look elsewhere)")
        folder = found[0]
    try:
        state = SweepState.load(folder)
    except (OSError, ValueError, TypeError) as err:
        raise SpecError(f"sweep: cannot read {folder / 'sweep.json'} ({first_line(err)})") from None
    if state.status != "running":
        raise SpecError(f"sweep: {state.run_name} already ended ({state.status}); nothing to continue")
    if DriverLock.held(folder):
        raise SpecError(f"sweep: {state.run_name} is still running (its driver holds {folder / 'driver.lock'})")
    anew = f"start it anew with `resurgence run {state.spec_file} --new` (its folder is left as it is)"
    data = check_resumable(folder, state, anew)
    try:
        experiment = parse_experiment(data)
    except SpecError as err:
        raise SpecError(f"sweep {state.run_name}: its spec.json is not valid here ({err}); {anew}") from None
    check_resources(experiment.spec, args)
    uri = check_tracking_uri(args.tracking_uri or state.tracking_uri)
    print(f"resurgence: continuing sweep {state.run_name} (started {state.started})", flush=True)
    return drive(experiment, uri, state.spec_file, args, state)


def sweep_base(spec: ExperimentSpec) -> Path:
    """The folder that holds the sweeps' own folders (run_sweep's sweep_dir)."""
    from orchestrator.paths import driver_folder

    return driver_folder(spec.storage_path, spec.cache_dir)


def drive(experiment: Experiment, uri: str, spec_file: str, args: argparse.Namespace, resume: Any) -> int:
    """Connect to (or start) Ray and run the sweep; prints the best trials."""
    # ---- compute starts here ----
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"  # trials see the driver's working directory
    import ray

    from orchestrator.attack import rank
    from orchestrator.ray_internals import check_ray_version
    from orchestrator.sweep import run_sweep

    check_ray_version("Tune's event wait, a local Ray on the loopback")  # before any Ray or MLflow state

    if args.address:
        # a wrong address is bad input: fail before any MLflow run exists
        check_address(args.address, args.address_field)
    try:
        if args.address:
            ray.init(address=args.address)
        else:
            # A new Ray of this driver's own, listening on this machine's loopback only ("local": not a Ray
            # that `ray start` left running here, which ray.init would join; its leases are files on this disk).
            start_local_ray(num_cpus=args.num_cpus)
    except (ConnectionError, ValueError, RuntimeError) as err:
        if not args.address:
            raise  # a local Ray that fails to start is not a user-input error
        field, address = args.address_field, args.address
        raise SpecError(f"{field}: cannot connect to Ray at {address!r} ({first_line(err)})") from None
    spec = experiment.spec
    outcome = run_sweep(experiment, uri, spec_file, resume=resume, one_node=not args.address)
    rows = rank(outcome.rows, spec)
    print_table(rows, spec)
    print(f"\nMLflow: {len(rows)} trial runs under parent run {outcome.parent} (experiment {spec.name!r})")
    if not uri.startswith(("http://", "https://")):
        print(f"  open the UI with:  mlflow ui --backend-store-uri {uri}")
    from orchestrator.store import runs_url

    link = runs_url(uri, outcome.tracker.experiment_id, outcome.run_name)
    print(f"  the sweep's runs:  {link}")
    if outcome.report is not None:
        print(f"  report:            {outcome.report} (and under report/ in the parent run's artifacts)")
    return 0 if outcome.ok else 1


def start_local_ray(num_cpus: int | None = None, **kwargs: Any) -> None:
    """Start a new Ray of this process's own, on this machine's loopback, with its daemons quieted
    (QUIET_LOCAL_RAY); `kwargs` go to ray.init."""
    from orchestrator.ray_internals import init_local_ray

    for name, value in QUIET_LOCAL_RAY.items():
        os.environ.setdefault(name, value)
    init_local_ray("127.0.0.1", include_dashboard=False, num_cpus=num_cpus, **kwargs)


def check_address(address: str, field: str = "--address", timeout_s: float = 5.0) -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for minutes); `field` names where
    the address came from in the error (the flag or RAY_ADDRESS)."""
    import socket
    from urllib.parse import urlparse

    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if parsed.hostname is None or parsed.port is None:
        raise SpecError(f"{field}: expected auto, HOST:PORT or ray://HOST:PORT (got {address!r})")
    try:
        socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s).close()
    except OSError as err:
        raise SpecError(f"{field}: nothing answers at {parsed.hostname}:{parsed.port} ({err})") from None


def print_table(rows: list[dict[str, Any]], spec: ExperimentSpec, top: int = 10) -> None:
    """The best trials; presence and resurgence with their 95% intervals over n images (presence_images). A
    grid of whole sections (erase sections, models) shows each as `#i` and a short name; a legend under the
    table gives each in full."""
    import json

    from orchestrator.formatting import fmt, grid_label, with_interval

    keys = sorted({k for r in rows for k in r["config"] if not k.startswith("_")})
    shown = ["presence_base", "presence_erased", "presence", "resurgence", "n", "retention", "ft_step"]
    head = ["rank", "trial", *dict.fromkeys([spec.search.metric, *shown]), *keys]

    def cell(r: dict[str, Any], k: str) -> str:
        if k in ("presence", "resurgence"):
            return with_interval(r.get(k), r.get(f"{k}_lo"), r.get(f"{k}_hi"), signed=k == "resurgence")
        return fmt(r.get("presence_images" if k == "n" else k))

    sections = {
        k: d.grid for k, d in spec.search.space.items() if any(isinstance(v, dict | list) for v in d.grid or [])
    }
    table = [head]
    for i, r in enumerate(rows[:top], 1):
        cells = [str(i), r["trial"] + (" (error)" if r["error"] else "")]
        cells += [cell(r, k) for k in head[2 : -len(keys) or None]]
        cells += [grid_label(r["config"].get(k), sections.get(k, [])) for k in keys]
        table.append(cells)
    widths = [max(len(row[j]) for row in table) for j in range(len(head))]
    print(f"\nBest trials by {spec.search.metric} ({spec.search.mode}), {len(rows)} in all:")
    for row in table:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    for k in (k for k in keys if k in sections):
        for j, value in enumerate(sections[k]):
            print(f"  {k} #{j}: {json.dumps(value, sort_keys=True)}")


def _data_name(spec: ExperimentSpec) -> str:
    ft = spec.finetune
    if ft.dataset is not None:
        return ft.dataset.name
    return " + ".join(f"{n} ({ft.datasets[n].name})" for n in ft.data.split("+"))  # type: ignore[union-attr]


def warn(warnings: list[str]) -> None:
    """Settings that run but do nothing, one line each on stderr (the sweep's parent run is tagged too)."""
    for w in warnings:
        print(f"resurgence: warning: {w}", file=sys.stderr, flush=True)


def cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.search import grid_cells
    from orchestrator.spec import apply_overrides, parse_experiment, read_spec, smoke_overrides

    data = read_spec(args.spec)
    if args.smoke_test:
        data = apply_overrides(data, smoke_overrides(data))
    experiment = parse_experiment(data, check_smoke=not args.smoke_test)
    spec = experiment.spec
    warn(experiment.warnings())
    dims = ", ".join(spec.search.space) or "none"
    cells = len(grid_cells(spec.search.space))
    trials = cells * spec.search.num_samples
    defender = ""
    if spec.defender is not None:
        d = spec.defender
        trials *= d.candidates
        defender = f"; defender ({d.objective}, {d.candidates} candidates) over {', '.join(d.space)}"
    print(
        f"{args.spec}: valid ({trials} trials in {cells} cell(s); model {spec.model.name}, method "
        f"{spec.erase.method}, data {_data_name(spec)}, detector {spec.evaluate.detector.name}; "
        f"searching {dims}{defender})"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from orchestrator.report import write_report
    from orchestrator.store import check_tracking_uri, default_tracking_uri

    uri = check_tracking_uri(args.tracking_uri or default_tracking_uri())
    out = Path(args.out) if args.out else Path("reports") / (args.sweep or args.experiment)
    index = write_report(uri, args.experiment, out, sweep=args.sweep)
    print(f"report: {index} (also logged to the sweep's parent run under report/)")
    return 0


def cmd_list(_: argparse.Namespace) -> int:
    from methods.catalog import REGISTRIES

    for kind, registry in REGISTRIES.items():
        print(f"{kind}:")
        for entry in registry:
            print(f"  {entry.name:<14} {entry.description}")
            presets = sorted(getattr(entry.config, "PRESETS", {}))
            if presets:  # official recipes (docs/recipes.md)
                print(f"  {'':<14} presets: {', '.join(presets)}")
    return 0


def cmd_toy(args: argparse.Namespace) -> int:
    return {"train-detector": cmd_toy_detector, "train-model": cmd_toy_model}[args.toy_command](args)


def cmd_toy_model(args: argparse.Namespace) -> int:
    from methods import toyworld

    out = Path(args.out) if args.out else toyworld.MODEL_DIR
    if not out.parent.is_dir():
        raise SpecError(f"--out: folder {out.parent} does not exist")
    net = toyworld.load_detector_net()
    start = time.perf_counter()
    losses: list[float] = []

    def log(step: int, loss: float, model: Any) -> None:
        losses.append(loss)
        if step % args.check_every == 0 or step == args.steps:
            report = toyworld.generation_accuracy(model, net)
            model.unet.train()
            model.pipe.text_encoder.train()
            recent = losses[-args.check_every :]
            print(
                f"step {step}  {time.perf_counter() - start:5.0f} s  loss {sum(recent) / len(recent):.4f}  "
                f"shape accuracy {report.shape_accuracy:.3f}  colour accuracy {report.colour_accuracy:.3f}",
                flush=True,
            )

    model = toyworld.train_toy_model(steps=args.steps, seed=args.seed, log=log)
    toyworld.save_toy_model(model, out)
    report = toyworld.generation_accuracy(model, net, per_pair=4)
    print(
        f"trained in {time.perf_counter() - start:.0f} s; per-shape accuracy: "
        + ", ".join(f"{k} {v:.2f}" for k, v in report.per_shape.items())
    )
    print(f"saved {out}")
    return 0


def cmd_toy_detector(args: argparse.Namespace) -> int:
    from methods import toyworld

    out = Path(args.out) if args.out else toyworld.DETECTOR_WEIGHTS
    if not out.parent.is_dir():
        raise SpecError(f"--out: folder {out.parent} does not exist")
    start = time.perf_counter()
    net = toyworld.train_detector(seed=args.seed, steps=args.steps)
    report = toyworld.evaluate_detector(net)
    toyworld.save_detector(net, out)
    print(
        f"trained in {time.perf_counter() - start:.0f} s; held-out accuracy: shape {report.shape_accuracy:.4f}, "
        f"colour {report.colour_accuracy:.4f}, shape on noisy images {report.noisy_shape_accuracy:.4f}"
    )
    print(f"saved {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for name, value in NO_TELEMETRY.items():
        os.environ.setdefault(name, value)
    try:
        commands = {
            "run": cmd_run,
            "resume": cmd_resume,
            "report": cmd_report,
            "validate": cmd_validate,
            "list": cmd_list,
            "toy": cmd_toy,
        }
        return commands[args.command](args)
    except SpecError as err:
        print(f"resurgence: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RayVersionError as err:  # the environment, not the input: one line all the same
        print(f"resurgence: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`resurgence list | head`): nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush stays quiet
        return 0


if __name__ == "__main__":
    sys.exit(main())
