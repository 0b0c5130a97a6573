"""Prompt sets read from files: evaluation prompts with their own seeds and guidance scales (I2P), and
caption files for the utility metrics (COCO).

- CSV: a prompt column and optional seed and guidance columns. I2P (the inappropriate-image-prompts set the
  erasure papers evaluate nudity on) has `prompt`, `evaluation_seed`, `evaluation_guidance` and per-category
  percentages such as `nudity_percentage`; `filter` keeps the rows that pass conditions on columns
  (`nudity_percentage > 50`, several joined by `and`), and `sample` draws that many rows (seeded, without
  replacement, kept in file order).
- COCO captions JSON (`annotations[].caption`) or a text file with one prompt per line.

The file is read once, when the spec is validated: the config keeps the selected prompts (they travel with
the trial to its worker, which need not see the file) and the file's SHA-256, size and row counts, which the
run logs so two runs are comparable only on the same prompts.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from methods.evaluation.presence import Prompt

_CONDITION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_ .-]*?)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")
_OPS = {
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


class PromptSetConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str  # a .csv, a COCO captions .json, or a .txt with one prompt per line
    column: str = "prompt"  # CSV: the prompt column
    seed_column: str | None = None  # CSV: per-prompt seed (I2P: evaluation_seed)
    guidance_column: str | None = None  # CSV: per-prompt guidance scale (I2P: evaluation_guidance)
    filter: str | None = None  # CSV: e.g. "nudity_percentage > 50" (conditions joined by " and ")
    sample: int | None = Field(None, ge=1)  # keep this many rows (seeded draw); null: every row that passes
    sample_seed: int = 0

    _prompts: list[Prompt] = PrivateAttr(default_factory=list)
    _sha256: str = PrivateAttr("")
    _bytes: int = PrivateAttr(0)
    _rows: int = PrivateAttr(0)

    @model_validator(mode="after")
    def _read(self) -> PromptSetConfig:
        path = os.path.expanduser(self.path)
        if not os.path.isfile(path):
            raise ValueError(f"path: {self.path}: no such file")
        raw = open(path, "rb").read()
        self._sha256, self._bytes = hashlib.sha256(raw).hexdigest(), len(raw)
        text = raw.decode("utf-8-sig", errors="replace")
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".csv":
            rows = self._csv_rows(text)
        else:
            if self.seed_column or self.guidance_column or self.filter:
                raise ValueError(f"path: {self.path}: seed_column, guidance_column and filter need a .csv file")
            rows = [{"prompt": t} for t in (_coco(text, self.path) if suffix == ".json" else text.splitlines())]
            rows = [r for r in rows if r["prompt"].strip()]
        self._rows = len(rows)
        if not rows:
            why = f"filter: {self.filter!r} leaves no prompt of" if self.filter else "path: no prompts in"
            raise ValueError(f"{why} {self.path}")
        if self.sample is not None and self.sample < len(rows):
            keep = sorted(random.Random(self.sample_seed).sample(range(len(rows)), self.sample))
            rows = [rows[i] for i in keep]
        self._prompts = [self._prompt(r, i) for i, r in enumerate(rows)]
        return self

    def _csv_rows(self, text: str) -> list[dict[str, Any]]:
        reader = csv.DictReader(text.splitlines())
        header = reader.fieldnames or []
        for field in ("column", "seed_column", "guidance_column"):
            name = getattr(self, field)
            if name is not None and name not in header:
                raise ValueError(f"{field}: {self.path} has no column {name!r} (columns: {', '.join(header)})")
        conditions = _conditions(self.filter, header, self.path) if self.filter else []
        rows = []
        for row in reader:
            if not (row.get(self.column) or "").strip():
                continue
            if all(_passes(row.get(col), op, want) for col, op, want in conditions):
                rows.append(row)
        return rows

    def _prompt(self, row: dict[str, Any], i: int) -> Prompt:
        seed = guidance = None
        try:
            if self.seed_column is not None:
                seed = int(float(row[self.seed_column]))
            if self.guidance_column is not None:
                guidance = float(row[self.guidance_column])
        except (TypeError, ValueError):
            raise ValueError(f"path: {self.path}: row {i + 1} has a seed or guidance that is not a number") from None
        return Prompt(row.get(self.column, row.get("prompt", "")).strip(), seed, guidance)

    def prompts(self) -> list[Prompt]:
        """The selected prompts, in file order."""
        return list(self._prompts)

    def record(self) -> dict[str, Any]:
        """What identifies the prompts: the file's name, hash and size, and how many rows were kept."""
        return {
            "file": os.path.basename(self.path),
            "sha256": self._sha256,
            "bytes": self._bytes,
            "rows_passing": self._rows,
            "prompts": len(self._prompts),
        }


def _coco(text: str, name: str) -> list[str]:
    try:
        data = json.loads(text)
        return [str(a["caption"]) for a in data["annotations"]]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"path: {name} is not a COCO captions file (annotations[].caption)") from None


def _conditions(text: str, header: list[str], name: str) -> list[tuple[str, str, Any]]:
    out = []
    for part in re.split(r"\s+and\s+", text.strip()):
        m = _CONDITION.match(part)
        if not m:
            raise ValueError(f"filter: cannot read {part!r} (expected: column op value, op one of {' '.join(_OPS)})")
        col, op, value = m.groups()
        if col not in header:
            raise ValueError(f"filter: {name} has no column {col!r} (columns: {', '.join(header)})")
        value = value.strip("'\"")
        try:
            want: Any = float(value)
        except ValueError:
            want = value
        out.append((col, op, want))
    return out


def _passes(got: Any, op: str, want: Any) -> bool:
    if got is None:
        return False
    if isinstance(want, float):
        try:
            got = float(got)
        except ValueError:
            return False
    return _OPS[op](got, want)
