"""The MLflow writer of a sweep: every run, param, metric, tag and artifact goes through one `Tracker` on the
driver (one writer, so a SQLite store does not lock), batched, and first into a write-ahead log so that nothing
is lost while the store is away or when the driver dies.

A trial's result is one `log_batch` call, not one call per metric (a synchronous call costs ~75 ms against a
server); Ray's own `MLflowLoggerCallback` makes one call per metric key and no parent run, which is why this
module exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.formatting import finite, first_line
from orchestrator.store import use_wal

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value, in characters
PARAMS_PER_BATCH = 100  # MlflowClient.log_batch limits
METRICS_PER_BATCH = 1000


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested mappings -> {"a.b.c": value}; lists and other leaves become JSON text."""
    if isinstance(data, dict) and data:
        out: dict[str, str] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    text = data if isinstance(data, str) else json.dumps(data, default=str)
    return {prefix: text[:MAX_PARAM_LEN]}


class Tracker:
    """Batched, durable MLflow writes for one experiment.

    The sweep's parent run is created synchronously; everything else (trial and candidate runs, params,
    metrics, tags, artifacts, run ends) is queued and written by a background thread that merges what has
    queued up into one `log_batch` per run, so the driver never waits on the store (`flush()` waits).

    Nothing is lost when the store is away: every queued write is first appended to a write-ahead log
    (`wal`, a JSON-lines file in the sweep's folder). If MLflow cannot be reached, the writer keeps the
    writes there, says so in the log and retries every `retry_s` seconds; when the store answers again it
    replays them in order and says so. A driver killed meanwhile leaves the log behind, and the next
    driver of the sweep (`resurgence resume`) replays what was not written. Replays are idempotent: a run
    is found again by its handle tag, params are written with the same values, and MLflow drops a metric
    point it already holds (same key, step, value and timestamp)."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        linger_s: float = 1.0,
        wal: Path | None = None,
        retry_s: float = 5.0,
    ) -> None:
        from mlflow import MlflowClient

        # A request to an unreachable server fails fast instead of backing off for minutes (MLflow's
        # default is 7 retries): the writer has its own retry loop, and the sweep never waits on it.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.uri = tracking_uri
        use_wal(tracking_uri)  # before MLflow's first connection: a fresh store is created in WAL mode
        self.client = MlflowClient(tracking_uri)
        self.write_seconds = 0.0  # time spent inside MLflow calls (the benchmark reports it)
        self.calls = 0
        self.errors: list[str] = []
        self.outages = 0  # times the store was unreachable
        self.replayed = 0  # writes replayed after an outage or from an earlier driver's log
        with self._timed():
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.linger_s = linger_s  # how long the writer lets writes accumulate before a round
        self.retry_s = retry_s
        self._ids: dict[str, str] = {}  # start_run_later's handles -> run ids, once created
        self._queue: queue.Queue[tuple[int, str, str, Any] | None] = queue.Queue()
        self._lock = threading.Lock()  # queue order = log order
        self._seq = 0
        self._written = 0  # every write up to this sequence number is in MLflow
        self._pending: dict[int, tuple[int, str, str, Any]] = {}  # queued, not yet confirmed (WAL compaction)
        self.wal = wal
        pending, self._seq = self._read_wal() if wal is not None else ([], 0)
        self._from_wal = {item[2] for item in pending}  # handles an earlier driver queued: look before creating
        if pending:
            print(f"resurgence: replaying {len(pending)} MLflow writes an earlier driver left in {wal}", flush=True)
            self.replayed += len(pending)
            for item in pending:
                self._pending[item[0]] = item
                self._queue.put(item)
        if wal is not None and wal.is_file():
            self._rewrite_wal()  # only what is pending, whole lines (a line a kill cut short is gone)
        self._writer = threading.Thread(target=self._drain, name="mlflow-writer", daemon=True)
        self._writer.start()

    @contextlib.contextmanager
    def _timed(self) -> Any:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.write_seconds += time.perf_counter() - start
            self.calls += 1

    # -- what callers do ---------------------------------------------------------------------------
    def start_run(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        """Create a run now and return its id (the sweep's parent: a store that cannot be reached at the
        start is an error the user sees at once)."""
        with self._timed():
            return self.client.create_run(
                self.experiment_id, tags=self._run_tags(name, tags, parent), run_name=name
            ).info.run_id

    def start_run_later(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        """Queue a run's creation and return a handle that every other method takes in place of its id
        (trial and candidate runs: the driver never waits on the store). `run_id(handle)` after `flush()`."""
        handle = f"pending-{uuid.uuid4().hex}"
        self._put("create", handle, (name, {**tags, HANDLE_TAG: handle}, parent))
        return handle

    def run_id(self, handle: str) -> str | None:
        return self._ids.get(handle, None if handle.startswith("pending-") else handle)

    def log(
        self, run_id: str, params: dict[str, str] | None = None, metrics: list[tuple[str, float, int]] | None = None
    ) -> None:
        now = int(time.time() * 1000)
        clean = [(k, float(v), now, int(step)) for k, v, step in (metrics or []) if finite(v)]
        self._put("log", run_id, (dict(params or {}), clean))

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        self._put("tags", run_id, dict(tags))

    def artifact(self, run_id: str, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self._put("artifact", run_id, (os.fspath(path), artifact_path))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self._put("end", run_id, status)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write is in MLflow (at most `timeout_s`); False if some are not."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def close(self, timeout_s: float = 600.0) -> bool:
        """Write what is queued and stop the writer. If MLflow stays unreachable for `timeout_s`, the rest
        stays in the write-ahead log for the next driver of the sweep, and this returns False."""
        if not self.flush(timeout_s):
            print(
                f"resurgence: MLflow still unreachable after {timeout_s:.0f} s; "
                f"{self._queue.unfinished_tasks} writes stay in {self.wal} (`resurgence resume` replays them)",
                flush=True,
            )
            return False
        self._queue.put(None)
        self._writer.join()
        return True

    # -- the write-ahead log -------------------------------------------------------------------------
    def _put(self, kind: str, handle: str, payload: Any) -> None:
        with self._lock:
            self._seq += 1
            item = (self._seq, kind, handle, payload)
            if self.wal is not None:
                with open(self.wal, "a") as f:
                    f.write(json.dumps(item) + "\n")
                self._pending[self._seq] = item
            self._queue.put(item)

    WAL_COMPACT_BYTES = 8 * 2**20  # a log past this size is rewritten with only its pending writes

    def _read_wal(self) -> tuple[list[tuple[int, str, str, Any]], int]:
        """The writes in the log that were not confirmed written (a line cut short by a kill is dropped), and
        the highest sequence number the log mentions (new writes are numbered above it, so a confirmation
        marker left in the log never covers them)."""
        assert self.wal is not None
        if not self.wal.is_file():
            return [], 0
        items, written, top = [], 0, 0
        for line in self.wal.read_text().splitlines():
            try:
                record = json.loads(line)
                if isinstance(record, dict):  # {"written": seq}: everything up to seq is in MLflow
                    written = max(written, int(record["written"]))
                    top = max(top, written)
                else:
                    item = (int(record[0]), str(record[1]), str(record[2]), record[3])
                    items.append(item)
                    top = max(top, item[0])
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError):
                continue  # a line a kill cut short (or two lines glued by one)
        return [item for item in items if item[0] > written], top

    def _rewrite_wal(self) -> None:
        """Replace the log by the writes still pending (atomically: a kill leaves the old log or the new)."""
        assert self.wal is not None
        tmp = self.wal.with_name(self.wal.name + ".tmp")
        tmp.write_text("".join(json.dumps(self._pending[k]) + "\n" for k in sorted(self._pending)))
        os.replace(tmp, self.wal)

    def _confirm(self, seq: int) -> None:
        """Everything up to `seq` is in MLflow: note it, and start the log afresh when nothing is pending
        (or rewrite it with only the pending writes once it has grown large)."""
        if self.wal is None:
            self._written = seq
            return
        with self._lock:
            self._written = seq
            for k in [k for k in self._pending if k <= seq]:
                del self._pending[k]
            if self._seq == seq:
                self.wal.write_text("")
            elif self.wal.stat().st_size > self.WAL_COMPACT_BYTES:
                self._rewrite_wal()
            else:
                with open(self.wal, "a") as f:
                    f.write(json.dumps({"written": seq}) + "\n")

    # -- the writer thread -----------------------------------------------------------------------------
    def _drain(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            batch = [item]
            if self.linger_s > 0:
                time.sleep(self.linger_s)  # let a trial's next events join this round: fewer, larger writes
            while len(batch) < 2000:  # whatever else is waiting goes in the same round of writes
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    self._queue.task_done()
                    break
                batch.append(more)
            self._write_until_done(batch)
            for _ in batch:
                self._queue.task_done()

    def _write_until_done(self, batch: list[tuple[int, str, str, Any]]) -> None:
        done: set[int] = set()  # writes of this round that succeeded (a retry skips them)
        down_since: float | None = None
        while True:
            try:
                self._write(batch, done, retry=down_since is not None)
                break
            except Exception as err:  # a store error must not kill the writer (or the sweep)
                message = f"{type(err).__name__}: {first_line(err)}"
                if not unreachable(err):
                    self.errors.append(message)
                    print(f"resurgence: MLflow write failed, skipped: {message}", flush=True)
                    break
                if down_since is None:
                    down_since = time.monotonic()
                    self.outages += 1
                    where = f"kept in {self.wal}" if self.wal is not None else "kept in memory"
                    print(
                        f"resurgence: MLflow is unreachable ({message}); the sweep goes on, its writes are "
                        f"{where}, retrying every {self.retry_s:g} s",
                        flush=True,
                    )
                time.sleep(self.retry_s)
                while True:  # what queued meanwhile joins this round (in order), so it replays with it
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        self._queue.put(None)
                        self._queue.task_done()
                        break
                    batch.append(more)
        if down_since is not None:
            self.replayed += len(batch)
            print(
                f"resurgence: MLflow is reachable again after {time.monotonic() - down_since:.0f} s; replayed "
                f"{len(batch)} writes, nothing lost",
                flush=True,
            )
        self._confirm(max(item[0] for item in batch))

    def _write(self, batch: list[tuple[int, str, str, Any]], done: set[int], retry: bool) -> None:
        """One round of writes: queued runs are created, then each run's params, metrics and tags go in as
        few `log_batch` calls as MLflow's limits allow, then artifacts and run ends, in queue order."""
        from mlflow.entities import Metric, Param, RunTag

        with self._timed():
            for seq, kind, handle, payload in batch:
                if kind == "create" and seq not in done:
                    self._attempt([seq], done, self._create, handle, *payload, lookup=retry or handle in self._from_wal)
            params: dict[str, dict[str, str]] = {}
            metrics: dict[str, list[Metric]] = {}
            tags: dict[str, dict[str, str]] = {}
            groups: dict[str, list[int]] = {}
            for seq, kind, handle, payload in batch:
                if seq in done or kind not in ("log", "tags"):
                    continue
                groups.setdefault(handle, []).append(seq)
                if kind == "log":
                    params.setdefault(handle, {}).update(payload[0])
                    metrics.setdefault(handle, []).extend(Metric(k, v, ts, st) for k, v, ts, st in payload[1])
                else:
                    tags.setdefault(handle, {}).update(payload)
            for handle, seqs in groups.items():
                plist = [Param(k, v) for k, v in params.get(handle, {}).items()]
                tlist = [RunTag(k, v) for k, v in tags.get(handle, {}).items()]
                self._attempt(seqs, done, self._log_batch, handle, plist, metrics.get(handle, []), tlist)
            for seq, kind, handle, payload in batch:
                if seq in done:
                    continue
                if kind == "artifact":
                    self._attempt([seq], done, self._log_artifact, handle, *payload)
                elif kind == "end":
                    self._attempt([seq], done, self._end, handle, payload)
                else:
                    done.add(seq)

    def _attempt(self, seqs: list[int], done: set[int], write: Callable[..., None], *args: Any, **kwargs: Any) -> None:
        """One write (a run's creation, one run's merged log_batch, an artifact, a run's end). A store that
        is away raises to the retry loop; any other error skips this write alone (said in the log), so one
        bad write never costs the rest of the round."""
        try:
            write(*args, **kwargs)
        except Exception as err:
            if unreachable(err):
                raise
            message = f"{type(err).__name__}: {first_line(err)}"
            self.errors.append(message)
            print(f"resurgence: MLflow write failed, skipped: {message}", flush=True)
        done.update(seqs)

    def _log_batch(self, handle: str, plist: list[Any], mlist: list[Any], tlist: list[Any]) -> None:
        run_id = self._resolve(handle)
        while plist or mlist or tlist:  # MLflow's limits: 100 params, 1000 metrics, 1000 items per call
            p, plist = plist[:PARAMS_PER_BATCH], plist[PARAMS_PER_BATCH:]
            room = METRICS_PER_BATCH - len(p)
            m, mlist = mlist[:room], mlist[room:]
            t, tlist = tlist[: room - len(m)], tlist[room - len(m) :]
            self.client.log_batch(run_id, metrics=m, params=p, tags=t)

    def _end(self, handle: str, status: str) -> None:
        self.client.set_terminated(self._resolve(handle), status)

    def _log_artifact(self, handle: str, path: str, artifact_path: str | None) -> None:
        if Path(path).is_file():  # a trial's file on this machine (not on a worker node)
            self.client.log_artifact(self._resolve(handle), path, artifact_path)

    def _create(self, handle: str, name: str, tags: dict[str, str], parent: str | None, lookup: bool) -> None:
        if handle in self._ids:
            return
        if lookup:  # a write that may have reached the store before it failed, or before a driver died
            found = self.client.search_runs([self.experiment_id], f"tags.`{HANDLE_TAG}` = '{handle}'", max_results=1)
            if found:
                self._ids[handle] = found[0].info.run_id
                return
        run = self.client.create_run(self.experiment_id, tags=self._run_tags(name, tags, parent), run_name=name)
        self._ids[handle] = run.info.run_id

    def _resolve(self, handle: str) -> str:
        """The run id of a handle; one created by an earlier driver is found by its tag."""
        run_id = self.run_id(handle)
        if run_id is None:
            found = self.client.search_runs([self.experiment_id], f"tags.`{HANDLE_TAG}` = '{handle}'", max_results=1)
            if not found:
                raise LookupError(f"no MLflow run for {handle}")
            run_id = self._ids[handle] = found[0].info.run_id
        return run_id

    def _run_tags(self, name: str, tags: dict[str, str], parent: str | None) -> dict[str, str]:
        tags = {**tags, "mlflow.runName": name}
        if parent:
            tags["mlflow.parentRunId"] = self._resolve(parent) if parent.startswith("pending-") else parent
        return tags


HANDLE_TAG = "resurgence.handle"  # a queued run's handle, so a replay finds the run instead of making another


def unreachable(err: BaseException) -> bool:
    """An error that says the store is away (connection refused, timed out, 5xx, SQLite busy), not that a
    write was wrong: such writes are kept and retried."""
    import requests

    if isinstance(err, ConnectionError | TimeoutError | requests.exceptions.RequestException):
        return True
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError | PermissionError | IsADirectoryError):
        return True  # sockets, name lookups, a network file system gone; not a file that is wrong
    text = str(err)
    signs = ("Max retries exceeded", "Connection refused", "Connection aborted", "timed out", "Read timed out")
    signs += ("database is locked", "RemoteDisconnected", "ConnectionError")
    # 5xx as a status code, not three digits inside a run id or a value
    return any(s in text for s in signs) or re.search(r"(?<![0-9a-fA-F.])50[234](?![0-9a-fA-F]|\.\d)", text) is not None
