"""Where a sweep's files go: `storage_path` is a local folder or a URI that pyarrow's filesystems open (s3://,
gs://, ...); `file://` is a local folder."""

from __future__ import annotations

import os
from pathlib import Path


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def storage_location(path: str) -> str:
    """A storage path as Tune and pyarrow take it: a URI as it is, a local folder absolute."""
    return path if is_remote(path) else os.path.abspath(os.path.expanduser(path.removeprefix("file://")))


def driver_folder(storage_path: str, cache_dir: str) -> Path:
    """The local folder under which the driver keeps its sweeps' own folders (spec copy, ledger, journals):
    the storage itself when it is local, else the cache folder."""
    return Path(cache_dir if is_remote(storage_path) else storage_path.removeprefix("file://"))
