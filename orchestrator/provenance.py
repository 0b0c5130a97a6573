"""Where a run's results come from: the code's commit and the versions of the libraries that compute them,
as MLflow tags on every run, and the libraries whose versions change an erased model (the erase cache's key)."""

from __future__ import annotations

import os
import subprocess
from importlib import metadata
from pathlib import Path

RUN_LIBRARIES = ("torch", "diffusers", "transformers", "ray", "mlflow", "optuna", "peft")  # tags on every run
ERASE_LIBRARIES = ("torch", "diffusers", "transformers", "peft")  # closed-form edits change with these


def package_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions by package name ("absent" for one that is not installed)."""
    out = {}
    for pkg in names:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def git_sha() -> str:
    """The commit of this code: $RESURGENCE_GIT_SHA if set (e.g. by a job without .git), else git's answer
    in the package's own checkout, else "unknown"."""
    if os.environ.get("RESURGENCE_GIT_SHA"):
        return os.environ["RESURGENCE_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def version_tags() -> dict[str, str]:
    return {f"version.{pkg}": version for pkg, version in package_versions(RUN_LIBRARIES).items()}
