"""The MLflow writer: one bad write costs only itself, outages are told apart from bad writes, and the
write-ahead log survives drivers that die at any point (numbering, cut lines, writes left at close),
and a re-run finds its sweep again."""

import json

import pytest
from mlflow.exceptions import MlflowException

from orchestrator.resume import left_runs, spec_hash
from orchestrator.writer import Tracker, unreachable


@pytest.fixture
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_one_bad_write_skips_only_itself(uri, tmp_path):
    tracker = Tracker(uri, "exp", linger_s=0.5, wal=tmp_path / "mlflow.wal")
    good, bad = tracker.start_run("good", {}), tracker.start_run("bad", {})
    real = tracker.client.log_batch

    def log_batch(run_id, **kwargs):
        if run_id == bad:
            raise MlflowException(f"INVALID_PARAMETER_VALUE: run {run_id} rejects this batch")
        return real(run_id, **kwargs)

    tracker.client.log_batch = log_batch
    # all in one round of writes (the writer lingers 0.5 s): the bad run's batch comes first
    tracker.log(bad, metrics=[("m", 1.0, 0)])
    tracker.log(good, metrics=[("m", 2.0, 0)])
    tracker.end(bad)
    tracker.end(good)
    assert tracker.close(30)
    assert len(tracker.errors) == 1 and "INVALID_PARAMETER_VALUE" in tracker.errors[0]
    run = tracker.client.get_run(good)
    assert run.data.metrics == {"m": 2.0} and run.info.status == "FINISHED"
    assert tracker.client.get_run(bad).info.status == "FINISHED"  # its end is a write of its own
    assert (tmp_path / "mlflow.wal").read_text() == ""  # nothing pending


@pytest.mark.parametrize(
    ("err", "away"),
    [
        (ConnectionRefusedError(111, "Connection refused"), True),
        (TimeoutError("timed out"), True),
        (MlflowException("API request to http://h/api failed with exception Max retries exceeded"), True),
        (MlflowException("API request failed: 503 Server Error: Service Unavailable"), True),
        (MlflowException("API request to /api/2.0/mlflow/runs/log-batch failed with error code 502."), True),
        (MlflowException("(sqlite3.OperationalError) database is locked"), True),
        (MlflowException("Run 'a1503bc9e0f14d2c8e7f6a5b4c3d2e1f' not found"), False),  # "503" in a run id
        (MlflowException("Invalid value 0.503 for parameter 'lr'"), False),
        (PermissionError(13, "Permission denied", "/artifacts/samples.png"), False),
        (FileNotFoundError(2, "No such file"), False),
        (LookupError("no MLflow run for pending-1"), False),
    ],
)
def test_outages_are_told_apart_from_bad_writes(err, away):
    assert unreachable(err) is away


def test_the_log_numbers_new_writes_above_everything_it_holds(uri, tmp_path):
    first = Tracker(uri, "exp", linger_s=0)
    parent = first.start_run("parent", {})
    assert first.close(30)
    wal = tmp_path / "mlflow.wal"
    # An earlier driver's log: write 4 done (marker 5), write 6 pending, and a line a kill cut short.
    wal.write_text(
        json.dumps([4, "tags", parent, {"old": "x"}])
        + "\n"
        + json.dumps({"written": 5})
        + "\n"
        + json.dumps([6, "tags", parent, {"pending": "yes"}])
        + "\n"
        + '[7, "tags", "'
    )
    tracker = Tracker(uri, "exp", linger_s=1.0, wal=wal)
    # rewritten at once with only the pending write, whole lines
    assert [json.loads(line)[0] for line in wal.read_text().splitlines()] == [6]
    tracker.set_tags(parent, {"new": "yes"})
    seqs = [json.loads(line)[0] for line in wal.read_text().splitlines()]
    assert seqs == [6, 7]  # above the earlier driver's highest number: no old marker covers it
    assert tracker.close(30)
    tags = tracker.client.get_run(parent).data.tags
    assert tags["pending"] == "yes" and tags["new"] == "yes" and "old" not in tags
    assert wal.read_text() == ""


def test_writes_left_at_close_wait_in_the_log_for_the_next_driver(uri, tmp_path):
    wal = tmp_path / "mlflow.wal"
    tracker = Tracker(uri, "exp", linger_s=0, wal=wal, retry_s=0.1)
    run = tracker.start_run("r", {})

    def down(*args, **kwargs):
        raise ConnectionRefusedError(111, "Connection refused")

    tracker.client.log_batch = down
    tracker.log(run, metrics=[("m", 3.0, 1)])
    assert tracker.close(timeout_s=1) is False  # the store stayed away: the write stays in the log
    assert any(json.loads(line)[1] == "log" for line in wal.read_text().splitlines())
    nxt = Tracker(uri, "exp", linger_s=0, wal=wal)
    assert nxt.close(30)
    assert nxt.client.get_run(run).data.metrics == {"m": 3.0}
    assert nxt.replayed == 1


def test_a_resumed_sweep_sees_trial_runs_still_in_the_log(uri, tmp_path):
    wal = tmp_path / "mlflow.wal"
    tags = {"sweep": "s1", "stage": "trial", "trial_id": "t0001"}
    # A dead driver queued this trial's run but never wrote it.
    wal.write_text(json.dumps([1, "create", "pending-abc", ["trial t0001", tags, None]]) + "\n")
    tracker = Tracker(uri, "exp", linger_s=1.0, wal=wal)  # lingers: the replay has not run yet
    found = left_runs(tracker, "s1", "trial", "trial_id")
    assert list(found) == ["t0001"]
    assert tracker.close(30)
    assert len(tracker.client.search_runs([tracker.experiment_id], "tags.trial_id = 't0001'")) == 1


def test_the_same_spec_is_found_again_from_another_working_directory():
    spec = {"name": "x", "search": {"num_samples": 4}, "cache_dir": "/tmp/ray/session_1/pkg/.resurgence_cache"}
    moved = {**spec, "cache_dir": "/tmp/ray/session_2/pkg/.resurgence_cache", "storage_path": "/shared/r"}
    assert spec_hash(spec) == spec_hash(moved)
    assert spec_hash(spec) != spec_hash({**spec, "search": {"num_samples": 5}})


def test_local_sqlite_store_uses_a_write_ahead_log(uri, tmp_path, monkeypatch):
    import sqlite3

    import orchestrator.store as store

    tracker = Tracker(uri, "exp", linger_s=0)
    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # A reader in the middle of a transaction (the MLflow UI, a report) does not hold up the sweep's writes.
    reader = sqlite3.connect(db, timeout=0.1)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM runs").fetchone()[0] == 0
    run = tracker.start_run("t", {})
    tracker.log(run, metrics=[("m", 1.0, 0)])
    tracker.end(run)
    assert tracker.close(30) and not tracker.errors
    assert reader.execute("SELECT count(*) FROM runs").fetchone()[0] == 0  # its snapshot is unchanged
    reader.rollback()
    assert reader.execute("SELECT count(*) FROM runs").fetchone()[0] == 1
    reader.close()
    # Left alone: a store on a network filesystem (WAL needs shared memory), and stores that are not SQLite.
    monkeypatch.setattr(store, "filesystem_type", lambda path: "nfs4")
    other = tmp_path / "nfs.db"
    assert not store.use_wal(f"sqlite:///{other}")
    assert not other.exists()
    assert not store.use_wal("http://127.0.0.1:5000")
    assert not store.use_wal("sqlite://")  # in memory
    assert store.filesystem_type(tmp_path) is not None
