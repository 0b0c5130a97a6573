"""The MLflow tracking store as the command sees it before a sweep: which URIs can work, the default local
store, and SQLite's own write-ahead journal for a store on local disk (importing this costs nothing)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from orchestrator.errors import SpecError

TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


UI_DEFAULT = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store
VIEW_TAG = "mlflow.sharedViewState."  # an experiment tag the MLflow UI reads a saved runs view from


def runs_view(sweep: str, metric: str, mode: str, searched: list[str]) -> tuple[str, str]:
    """The experiment tag (key, JSON value) of a runs view of one sweep: its trial runs, best first by `metric`,
    with the resurgence metrics and the searched hyperparameters as columns. MLflow 3's UI keeps a shared view
    in an experiment tag and opens it by its key (`viewStateShareKey`); its filter, order and columns are in
    the JSON (the UI's own names: searchFilter, orderByKey, orderByAsc, selectedColumns)."""
    import json

    metrics = dict.fromkeys([metric, "resurgence", "presence", "presence_erased", "retention", "clip_score", "fid"])
    columns = [f"metrics.`{m}`" for m in metrics] + [f"params.`{p}`" for p in searched]
    state = {
        "searchFilter": f"tags.sweep = '{sweep}' and tags.stage = 'trial'",
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": mode == "min",
        "selectedColumns": columns,
    }
    return VIEW_TAG + sweep, json.dumps(state)


def runs_url(tracking_uri: str, experiment_id: str, sweep: str) -> str:
    """A link that opens the MLflow UI on the sweep's runs view (`runs_view`, saved as an experiment tag).
    MLflow 3's UI opens an experiment on its GenAI traces page ("0 traces", no runs) unless the URL asks for
    the machine-learning view (`workflowType=machine_learning`)."""
    from urllib.parse import quote, urlencode

    base = tracking_uri.rstrip("/") if urlparse(tracking_uri).scheme in ("http", "https") else UI_DEFAULT
    query = urlencode({"workflowType": "machine_learning", "viewStateShareKey": sweep}, quote_via=quote)
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def check_tracking_uri(uri: str) -> str:
    """Reject a tracking URI that cannot work, before anything runs; returns it unchanged."""
    scheme = urlparse(uri).scheme.split("+")[0]
    if scheme not in TRACKING_SCHEMES:
        raise SpecError(
            f"--tracking-uri: unsupported scheme {scheme or 'none'!r} in {uri!r} "
            f"(use one of {', '.join(TRACKING_SCHEMES)}; e.g. sqlite:///mlflow.db)"
        )
    if scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.parent.is_dir():
            raise SpecError(f"--tracking-uri: folder {path.parent} does not exist")
    return uri


# Filesystems where SQLite's write-ahead log works: it needs shared memory between the processes that open
# the database, which network filesystems (NFS, SMB, FUSE mounts) do not give (sqlite.org/wal.html).
LOCAL_FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "apfs", "hfs")


def filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding `path` (the longest mount point above it in /proc/mounts), or
    None where that cannot be told (no /proc: not Linux)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    path, best = path.resolve(), ("", None)
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (path == Path(point) or Path(point) in path.parents) and len(point) > len(best[0]):
            best = (point, fields[2])
    return best[1]


def use_wal(uri: str) -> bool:
    """Put a SQLite tracking store on local disk in SQLite's WAL journal mode (a setting the database
    file keeps; not to be confused with the Tracker's own log of pending writes); returns whether it is. A
    commit then appends to one log instead of writing and deleting a rollback journal (about a third less
    time per `log_batch` on this machine), and readers, such as `mlflow ui` or `resurgence report` during a
    sweep, no longer block the sweep's writer. Stores of other kinds, and SQLite files on a network
    filesystem, are left as they are."""
    if not uri.startswith("sqlite:///"):  # also not an in-memory store (sqlite://)
        return False
    path = Path(uri.removeprefix("sqlite:///"))
    if filesystem_type(path.parent) not in LOCAL_FILESYSTEMS:
        return False
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(path, timeout=2)) as db:
            return db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() == "wal"
    except sqlite3.Error:  # e.g. another process holds the store just now: it works as it was
        return False


def search_all(client: Any, experiment_id: str, filter_string: str, order_by: list[str] | None = None) -> list[Any]:
    """Every run of an experiment that `filter_string` matches (MLflow returns them a page at a time)."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=1000, order_by=order_by, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs
