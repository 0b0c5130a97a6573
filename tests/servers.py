"""Real servers on loopback for the cluster tests: a Ray head started by `ray start`, an `mlflow server`.
Each runs in a session of its own, and stopping it kills every process it started (found by the session,
and for Ray by its temporary folder), so no test leaves a server behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent  # the virtual environment's ray, mlflow and python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited: {log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing answered at {url}: {log.read_text()[-3000:] if log else ''}")
        time.sleep(0.5)


def kill_tree(proc: subprocess.Popen, marker: str | None = None) -> None:
    """Kill the process's session and, with `marker`, every process whose environment or command line
    carries it (Ray daemonizes some of its processes out of the session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    if marker is None:
        return
    for _ in range(3):
        left = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if marker in " ".join(p.info["cmdline"] or []) or p.environ().get("RAY_TMPDIR") == marker:
                    left.append(p)
            except (psutil.Error, OSError):
                continue
        if not left:
            return
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)


class MlflowServer:
    """`mlflow server` with a SQLite backend and an artifact folder, on 127.0.0.1."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        log = self.root / "mlflow-server.log"
        cmd = [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        self.proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=open(log, "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # noqa: SIM115
        )
        wait_http(f"{self.uri}/health", 120, self.proc, log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc, marker=str(self.root / "mlflow.db"))
            self.proc = None


class RayHead:
    """`ray start --head` on 127.0.0.1 (dashboard and job API on 127.0.0.1 too), blocking in its own session."""

    def __init__(self, root: Path, env: dict[str, str], num_cpus: int = 2) -> None:
        self.root, self.env, self.num_cpus = root, env, num_cpus
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RayHead:
        log = self.root / "ray-head.log"
        cmd = [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
            "--num-cpus",
            str(self.num_cpus),
            "--disable-usage-stats",
        ]
        self.proc = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=open(log, "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # noqa: SIM115
        )
        wait_http(f"{self.address}/api/version", 180, self.proc, log)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            kill_tree(self.proc, marker=self.env["RAY_TMPDIR"])
            self.proc = None
