"""Erase once, fine-tune many: a content-addressed cache of erased models under the run's storage.

An entry is a folder `<storage>/erase_cache/<key>/` whose key is the SHA-256 of what produced it: the
base model, the erasure method and its resolved config, the seed, the concepts, and the code version (a
hash of the `methods/` sources, so editing a method invalidates its entries, and library versions that
change closed-form edits). The storage is any URI that pyarrow's filesystems open: a local or NFS path,
`file://...`, `s3://bucket/prefix`, `gs://...`. An entry is complete when its `COMPLETE` marker exists;
the marker is written after every file, so a reader never sees half an entry.

Exactly one producer per key: before producing, a trial takes a *lease* on the key. On a Ray cluster the
leases live in one named actor (a `LeaseTable`), shared by every trial on every node; on one machine (the
local Ray that `resurgence run` starts, scripts without Ray) they are lock files on local disk. A trial that
finds the lease taken waits for the marker; if the producer dies, its lease expires (it is renewed every few
seconds while producing) and a waiting trial takes over. Entries are downloaded once per node into a local
staging folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from orchestrator.paths import storage_location
from orchestrator.provenance import ERASE_LIBRARIES, package_versions

log = logging.getLogger("resurgence.cache")

T = TypeVar("T")
MARKER = "COMPLETE"
LEASE_TTL_S = 60.0  # a lease nobody renewed for this long belongs to a dead producer
RENEW_EVERY_S = 10.0
POLL_S = 0.5  # how often a waiting trial looks for the marker


# -- keys -------------------------------------------------------------------------------------------------
_CODE_VERSION: str | None = None


def code_version() -> str:
    """Hash of every `methods/` source file and of the libraries the methods compute with."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        import methods

        h = hashlib.sha256()
        root = Path(methods.__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
        for pkg, version in package_versions(ERASE_LIBRARIES).items():
            h.update(f"{pkg}={version}".encode())
        _CODE_VERSION = h.hexdigest()[:16]
    return _CODE_VERSION


def content_key(kind: str, content: Any) -> str:
    """A stable address for JSON-able `content` (sorted keys, so mapping order does not matter)."""
    text = json.dumps({"kind": kind, "code": code_version(), "content": content}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


# -- leases -----------------------------------------------------------------------------------------------
class Leases(Protocol):
    def acquire(self, key: str, holder: str) -> bool: ...  # True: `holder` is now the producer

    def renew(self, key: str, holder: str) -> None: ...

    def release(self, key: str, holder: str) -> None: ...


class LeaseTable:
    """The lease bookkeeping itself (in the actor, or tests): key -> (holder, last renewal)."""

    def __init__(self, ttl_s: float = LEASE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self.leases: dict[str, tuple[str, float]] = {}

    def acquire(self, key: str, holder: str) -> bool:
        now = time.monotonic()
        current = self.leases.get(key)
        if current is None or current[0] == holder or now - current[1] > self.ttl_s:
            if current is not None and current[0] != holder:
                log.warning("erase cache: lease on %s by %s expired; %s takes over", key, current[0], holder)
            self.leases[key] = (holder, now)
            return True
        return False

    def renew(self, key: str, holder: str) -> None:
        if self.leases.get(key, ("",))[0] == holder:
            self.leases[key] = (holder, time.monotonic())

    def release(self, key: str, holder: str) -> None:
        if self.leases.get(key, ("",))[0] == holder:
            del self.leases[key]


LEASE_NAMESPACE = "resurgence"


def start_lease_actor(name: str) -> Any:
    """The sweep's lease actor, started by the driver (it lives as long as the driver's job); trials find
    it by name. It takes no CPU, so it never holds back a trial."""
    import ray

    remote = ray.remote(num_cpus=0, max_restarts=-1)(LeaseTable)
    return remote.options(name=name, namespace=LEASE_NAMESPACE, get_if_exists=True).remote()


class ActorLeases:
    """Leases held in one named Ray actor: every trial of the job, on any node, asks the same table."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def acquire(self, key: str, holder: str) -> bool:
        import ray

        return bool(ray.get(self.actor.acquire.remote(key, holder)))

    def renew(self, key: str, holder: str) -> None:
        import ray

        ray.get(self.actor.renew.remote(key, holder))

    def release(self, key: str, holder: str) -> None:
        import ray

        ray.get(self.actor.release.remote(key, holder))


class FileLeases:
    """Leases as lock files created with O_EXCL in a local folder (processes of one machine, without Ray);
    a lock file whose modification time is older than the TTL is stale and may be taken over."""

    def __init__(self, folder: Path, ttl_s: float = LEASE_TTL_S) -> None:
        self.folder = folder
        self.ttl_s = ttl_s
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.lease"

    def acquire(self, key: str, holder: str) -> bool:
        path = self._path(key)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                if path.read_text() == holder:
                    return True
                if time.time() - path.stat().st_mtime <= self.ttl_s:
                    return False
                stale = path.with_suffix(f".stale-{holder}")
                os.rename(path, stale)  # atomic: of several takers only one renames it
                stale.unlink()
            except FileNotFoundError:
                pass  # released or taken over meanwhile: try again
            return self.acquire(key, holder)
        with os.fdopen(fd, "w") as f:
            f.write(holder)
        return True

    def renew(self, key: str, holder: str) -> None:
        try:
            if self._path(key).read_text() == holder:
                os.utime(self._path(key))
        except FileNotFoundError:
            pass

    def release(self, key: str, holder: str) -> None:
        try:
            if self._path(key).read_text() == holder:
                self._path(key).unlink()
        except FileNotFoundError:
            pass


# -- the cache ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fetched:
    folder: Path  # the entry's files, on local disk
    status: str  # "hit" (another trial produced it) or "miss" (this trial produced it)
    waited_s: float  # time spent waiting for another producer


class EraseCache:
    """Entries under `root` (a URI or path). Entries on a remote filesystem are downloaded once per node
    into `staging`; on a local or NFS path they are used where they lie."""

    def __init__(self, root: str, staging: Path, leases: Leases, filesystem: Any = None) -> None:
        from pyarrow import fs

        self.root_uri = root
        if filesystem is None:  # `filesystem`: an explicit pyarrow filesystem and a path in it (tests)
            self.fs, self.root = fs.FileSystem.from_uri(storage_location(root))
        else:
            self.fs, self.root = filesystem, root
        self.local = isinstance(self.fs, fs.LocalFileSystem)
        self.staging = Path(self.root) if self.local else staging
        self.leases = leases
        self.holder = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def _remote(self, key: str, name: str = "") -> str:
        return "/".join(p for p in (self.root.rstrip("/"), key, name) if p)

    def complete(self, key: str) -> bool:
        from pyarrow import fs

        return self.fs.get_file_info(self._remote(key, MARKER)).type != fs.FileType.NotFound

    def get(self, key: str, produce: Callable[[Path], None], timeout_s: float = 24 * 3600) -> Fetched:
        """The entry's local folder, produced by `produce(folder)` if nobody has it yet, exactly once
        across every trial that asks for `key` at the same time."""
        local = self.staging / key
        if (local / MARKER).is_file():
            return Fetched(local, "hit", 0.0)
        start = time.monotonic()
        while True:
            if self.complete(key):
                self._download(key, local)
                return Fetched(local, "hit", time.monotonic() - start)
            if self.leases.acquire(key, self.holder):
                break
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"erase cache: waited {timeout_s:.0f} s for another trial to produce {key}")
            time.sleep(POLL_S)
        try:
            if self.complete(key):  # produced between our look and our lease
                self._download(key, local)
                return Fetched(local, "hit", time.monotonic() - start)
            waited = time.monotonic() - start
            self._produce(key, local, produce)
            return Fetched(local, "miss", waited)
        finally:
            self.leases.release(key, self.holder)

    def _produce(self, key: str, local: Path, produce: Callable[[Path], None]) -> None:
        work = local.with_name(f"{key}.tmp-{self.holder}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        stop = threading.Event()

        def renew() -> None:  # keep the lease while producing (an erasure can take an hour)
            while not stop.wait(RENEW_EVERY_S):
                self.leases.renew(key, self.holder)

        renewer = threading.Thread(target=renew, daemon=True)
        renewer.start()
        try:
            produce(work)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        finally:
            stop.set()
            renewer.join()
        if not self.local:
            self._upload(work, key)
        (work / MARKER).write_text(self.holder)  # last: the entry is complete
        shutil.rmtree(local, ignore_errors=True)  # a half entry of a dead producer
        os.replace(work, local)  # atomic on one filesystem

    def _upload(self, work: Path, key: str) -> None:
        from pyarrow import fs

        local_fs = fs.LocalFileSystem()
        self.fs.create_dir(self._remote(key), recursive=True)
        for path in sorted(work.rglob("*")):
            if path.is_file():
                dest = self._remote(key, str(path.relative_to(work)))
                fs.copy_files(str(path), dest, source_filesystem=local_fs, destination_filesystem=self.fs)
        with self.fs.open_output_stream(self._remote(key, MARKER)) as out:  # last: the entry is complete
            out.write(self.holder.encode())

    def _download(self, key: str, local: Path) -> None:
        if self.local:
            return  # the entry is already here
        from pyarrow import fs

        work = local.with_name(f"{key}.dl-{self.holder}")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        fs.copy_files(
            self._remote(key), str(work), source_filesystem=self.fs, destination_filesystem=fs.LocalFileSystem()
        )
        shutil.rmtree(local, ignore_errors=True)
        try:
            os.replace(work, local)
        except OSError:  # another trial on this node staged it first
            shutil.rmtree(work, ignore_errors=True)


def cache_root(storage_path: str) -> str:
    return storage_path.rstrip("/") + "/erase_cache"


def open_cache(storage_path: str, staging: Path, lease_actor_name: str | None = None) -> EraseCache:
    """The run's erase cache: leases from the sweep's actor when it has one, lock files otherwise."""
    if lease_actor_name:
        import ray

        leases: Leases = ActorLeases(ray.get_actor(lease_actor_name, namespace=LEASE_NAMESPACE))
    else:
        leases = FileLeases(staging / "leases")
    return EraseCache(cache_root(storage_path), staging, leases)
