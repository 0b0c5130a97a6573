"""The sweep's ledger of trials: what a driver that dies at any moment leaves for the next one.

Every trial of a sweep's budget has a name fixed before it runs (`t00003`, or `d001-t00003` in a defender's
wave): its *slot*. The ledger (`trials.jsonl` in the sweep's folder) gets one line when a slot's trial ends,
with the trial's row (its final metrics, the peak of its curve, its config), and one line for every
checkpoint a trial saves. Each line is appended and flushed to disk before anything else learns of the end:
the Optuna study is told only after the line is down (search.py), so a driver killed between the two
leaves a slot the ledger calls done and the study calls running, which the next driver mends; never the
other way round.

A resumed sweep trusts the ledger: slots in it are done (their rows are read back), every other slot runs,
reusing its Optuna trial and MLflow run if the dead driver had started it, from its last checkpoint if it
had one. Tune's own experiment state is not used for this: it is written only every minute (a driver-CPU
saving), so it lags behind the studies.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

Row = dict[str, Any]
SLOT_KEY = "_trial"  # a trial's config: its slot (the "_" keys are the sweep's bookkeeping, not spec values)
RESUME_KEY = "_resume_from"  # a trial's config: the checkpoint a dead driver's run of the slot left


class LedgerError(ValueError):
    """The ledger cannot be read (a line other than the last one is not JSON)."""


class TrialLedger:
    """`trials.jsonl`: {"slot": ..., "row": {...}} when a trial ends, {"slot": ..., "checkpoint": uri} when it
    saves a checkpoint. Plain data and a path, so Tune can pickle the objects that hold it."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / "trials.jsonl"
        self._done: dict[str, Row] | None = None
        self._checkpoints: dict[str, str] | None = None

    def _read(self) -> None:
        done: dict[str, Row] = {}
        checkpoints: dict[str, str] = {}
        if self.path.is_file():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # a line cut short by a kill mid-write: that trial is not done
                data = data[: data.rfind(b"\n") + 1]
                with open(self.path, "r+b") as f:
                    f.truncate(len(data))
            for i, line in enumerate(data.decode().splitlines()):
                try:
                    record = json.loads(line)
                    slot = str(record["slot"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise LedgerError(f"{self.path}: line {i + 1} is not a ledger record ({err})") from None
                if "row" in record:
                    done[slot] = record["row"]
                elif "checkpoint" in record:
                    checkpoints[slot] = str(record["checkpoint"])
        self._done, self._checkpoints = done, checkpoints

    def done(self) -> dict[str, Row]:
        """Rows of the slots whose trial ended, by slot."""
        if self._done is None:
            self._read()
        assert self._done is not None
        return self._done

    def checkpoints(self) -> dict[str, str]:
        """The last checkpoint each slot's trial saved (a path or URI), by slot."""
        if self._checkpoints is None:
            self._read()
        assert self._checkpoints is not None
        return self._checkpoints

    def record(self, slot: str, row: Row) -> None:
        """A slot's trial ended: its row goes down (and to disk) before the caller tells anyone else."""
        done = self.done()
        self._append({"slot": slot, "row": row})
        done[slot] = row

    def checkpoint(self, slot: str, uri: str) -> None:
        checkpoints = self.checkpoints()
        self._append({"slot": slot, "checkpoint": uri})
        checkpoints[slot] = uri

    def _append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a lost machine keeps it too, not only a killed process

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_done": None, "_checkpoints": None}
