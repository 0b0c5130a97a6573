"""Test code inside every Python process of a command a test starts (the CLI's driver, Ray's workers): a
`sitecustomize.py` put first on the command's PYTHONPATH that, when a module of the project is first imported
in a process, hands the fresh module to a function of tests/ (which may add a hook to it, or wrap a function
to count its calls). Production code reads nothing for it: the test passes its code in this way.

    env = inject(env, tmp_path / "site", {"orchestrator.trial": "tests.test_faults:add_fault"}, FAULT='{...}')
"""

from __future__ import annotations

import json
from pathlib import Path

SITECUSTOMIZE = """
import importlib, importlib.abc, importlib.util, sys

AFTER = {after}  # module -> "package.module:function", called with the module once it is imported


class _After(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in AFTER:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            where, function = AFTER[name].split(":")
            getattr(importlib.import_module(where), function)(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _After())
"""


def inject(env: dict[str, str], folder: Path, after: dict[str, str], **settings: str) -> dict[str, str]:
    """`env` for a command whose processes run `after`'s functions on those modules; `settings` are set in its
    environment for them (the test's own variables, e.g. what fault to cause: only tests/ reads them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE.format(after=json.dumps(after)))
    path = [str(folder), env.get("PYTHONPATH", "")]
    return {**env, **settings, "PYTHONPATH": ":".join(p for p in path if p)}
