"""Continuing a sweep whose driver died: what is in the sweep's folder, whether it can be continued, and the
MLflow runs the dead driver left.

The sweep's folder (under `storage_path`, or under `cache_dir` when storage is remote) holds:
- `sweep.json`: the sweep's state (`SweepState`), with the folder layout it was written in;
- `spec.json` and `experiment.yaml`: the spec as run (overrides applied);
- `trials.jsonl`: the ledger of ended trials and their checkpoints (orchestrator/ledger.py);
- `optuna.journal` (the attacker cells' studies) and `defender.journal` (the defender's study);
- `mlflow.wal`: MLflow writes not yet confirmed (orchestrator/writer.py);
- `driver.lock`: held by the living driver.

A continued sweep reaches the end state an uninterrupted one reaches: every slot's trial run once to its end
(a slot the dead driver had started runs again, from its last checkpoint if it saved one), one MLflow child
run per trial (the same run goes on, no step logged twice), each study told once per trial. What cannot be
continued (a folder of another layout, a spec changed since, a ledger or journal that cannot be read) is
refused with one line that says what to do, and nothing is deleted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import SpecError
from orchestrator.ledger import LedgerError, TrialLedger
from orchestrator.metric_names import TIMING_METRICS
from orchestrator.store import search_all
from orchestrator.writer import Tracker

# The folder layout this version writes and reads. 1: before the ledger (rows per wave, Tune's experiment
# state restored); 2: slots and the ledger.
LAYOUT = 2


@dataclass
class SweepState:
    """`sweep.json` in the sweep's folder: what another driver needs to continue it."""

    run_name: str
    spec_file: str
    tracking_uri: str
    parent: str | None  # the MLflow parent run
    spec_hash: str  # of the spec as run (overrides applied): re-running the same command finds it
    status: str  # running, finished or failed
    started: str
    layout: int = LAYOUT

    def save(self, folder: Path) -> None:
        tmp = folder / "sweep.json.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        tmp.replace(folder / "sweep.json")

    @classmethod
    def load(cls, folder: Path) -> SweepState:
        data = json.loads((folder / "sweep.json").read_text())
        data.setdefault("layout", 1)  # written before layouts were numbered
        return cls(**data)


def spec_hash(data: dict[str, Any]) -> str:
    """What identifies a sweep's spec when the same command is run again. Its folders are left out: they are
    absolute paths by then, and a relative `cache_dir` resolves under the job's working directory, which
    `ray job submit` unpacks into a new Ray session's folder after the head node is replaced."""
    kept = {k: v for k, v in data.items() if k not in ("storage_path", "cache_dir")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


class DriverLock:
    """An exclusive lock on the sweep's folder while its driver lives (flock: the kernel drops it when the
    process dies, even by SIGKILL), so a sweep is continued only when its driver is gone."""

    def __init__(self, folder: Path) -> None:
        import fcntl

        self.fd = os.open(folder / "driver.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise SpecError(f"sweep {folder.name}: another driver is running it") from None

    def release(self) -> None:
        os.close(self.fd)

    @staticmethod
    def held(folder: Path) -> bool:
        import fcntl

        if not (folder / "driver.lock").exists():
            return False
        fd = os.open(folder / "driver.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)


def unfinished_sweeps(base: Path, data: dict[str, Any] | None = None) -> list[Path]:
    """Sweep folders under `base` whose driver died before the end (newest first); with `data`, only
    those of this very spec."""
    found = []
    for state_file in base.glob("*/sweep.json"):
        try:
            state = SweepState.load(state_file.parent)
        except (OSError, ValueError, TypeError):
            continue
        if state.status != "running" or DriverLock.held(state_file.parent):
            continue
        if data is not None and state.spec_hash != spec_hash(data):
            continue
        found.append(state_file.parent)
    return sorted(found, key=lambda f: f.stat().st_mtime, reverse=True)


def check_resumable(folder: Path, state: SweepState, anew: str) -> dict[str, Any]:
    """The spec of a sweep that can be continued, read from its folder; a SpecError (one line: what is
    wrong, and `anew`, what to do instead) when it cannot. Reads everything a continued sweep will read,
    before anything runs; changes nothing."""
    name = state.run_name
    if state.layout != LAYOUT:
        raise SpecError(
            f"sweep {name}: its folder {folder} was written by another version of resurgence (layout "
            f"{state.layout}, this version continues layout {LAYOUT}); {anew}"
        )
    try:
        data = json.loads((folder / "spec.json").read_text())
    except (OSError, ValueError) as err:
        raise SpecError(f"sweep {name}: cannot read {folder / 'spec.json'} ({err}); {anew}") from None
    if spec_hash(data) != state.spec_hash:
        raise SpecError(f"sweep {name}: {folder / 'spec.json'} changed since the sweep started; {anew}")
    try:
        TrialLedger(folder).done()
    except (OSError, LedgerError, UnicodeDecodeError) as err:
        raise SpecError(f"sweep {name}: {err}; {anew}") from None
    for journal in ("optuna.journal", "defender.journal"):
        if (folder / journal).is_file():
            check_journal(folder / journal, name, anew)
    return data


def check_journal(path: Path, name: str, anew: str) -> None:
    import optuna

    try:
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(deepcopy=False)
    except Exception as err:  # noqa: BLE001  # Optuna raises many kinds on a damaged journal
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SpecError(f"sweep {name}: the Optuna journal {path} cannot be read ({text}); {anew}") from None


# -- the MLflow runs a dead driver left ---------------------------------------------------------------
@dataclass(frozen=True)
class LeftRun:
    """A run an earlier driver of the sweep made (a trial's or a defender candidate's)."""

    run_id: str
    status: str  # RUNNING until its driver ended it
    last_step: int  # the last ft_step it holds (-1: none)
    metrics: dict[str, float]


def left_runs(tracker: Tracker, run_name: str, stage: str, key: str) -> dict[str, LeftRun]:
    """The runs of a sweep at `stage` in MLflow, by their tag `key` (trial_id: the slot; candidate). The
    writes an earlier driver left in the write-ahead log go in first: a run it had queued but not written
    would otherwise be missed here, made again, and then replayed as a second run."""
    if not tracker.flush(600):
        raise RuntimeError("MLflow stayed unreachable for 600 s; the sweep cannot be continued without it")
    out: dict[str, LeftRun] = {}
    for run in search_all(
        tracker.client, tracker.experiment_id, f"tags.sweep = '{run_name}' and tags.stage = '{stage}'"
    ):
        step = run.data.metrics.get("ft_step")
        out[run.data.tags[key]] = LeftRun(
            run.info.run_id, run.info.status, int(step) if step is not None else -1, dict(run.data.metrics)
        )
    return out


def new_metrics(have: dict[str, float], metrics: list[tuple[str, float, int]]) -> list[tuple[str, float, int]]:
    """The metrics a run does not hold yet with these values (a continued driver logs what the dead one
    had not, and nothing twice)."""
    return [m for m in metrics if have.get(m[0]) != m[1]]


def continue_trial_runs(tracker: Tracker, run_name: str, ledger: TrialLedger) -> dict[str, tuple[str, int]]:
    """The trial runs an earlier driver left: a run whose trial the ledger holds as ended but that its
    driver did not close is closed now (its last timings, its outcome, its status); the others go on with
    the trials that run again (slot -> (run id, last ft_step))."""
    done = ledger.done()
    going_on: dict[str, tuple[str, int]] = {}
    for slot, run in left_runs(tracker, run_name, "trial", "trial_id").items():
        if slot not in done:
            going_on[slot] = (run.run_id, run.last_step)
            continue
        if run.status != "RUNNING":
            continue
        row = done[slot]
        timings = [(k, row[k], 0) for k in TIMING_METRICS if isinstance(row.get(k), int | float)]
        tracker.log(run.run_id, metrics=new_metrics(run.metrics, timings))
        outcome = "error" if row.get("error") else "completed"
        tracker.set_tags(run.run_id, {"outcome": outcome})
        tracker.end(run.run_id, "FAILED" if row.get("error") else "FINISHED")
    return going_on


def reopen_parent(uri: str, experiment: str, parent: str, folder: Path) -> tuple[Tracker, str]:
    """The parent run of a sweep another driver started: RUNNING again, and its unwritten writes replayed."""
    tracker = Tracker(uri, experiment, wal=folder / "mlflow.wal")
    tracker.client.update_run(parent, status="RUNNING")
    return tracker, parent
