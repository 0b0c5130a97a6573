"""Another revision of this repository, checked out beside it for a side-by-side benchmark."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def revision(rev: str, where: Path) -> Iterator[Path]:
    """`rev` checked out into a temporary git worktree at `where` (removed afterwards)."""
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(where), rev], check=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(where)], check=False)
