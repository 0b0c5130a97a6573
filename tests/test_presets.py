"""Presets: every official recipe in docs/recipes.md's table is the code's, each validates, and a preset
is a starting point that fields beside it override (nested configs key by key)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import methods.catalog  # noqa: F401  (registers every method)
from methods.registry import Registry
from tests.conftest import REPO


def _methods() -> Registry:
    from methods.erasers.base import METHODS

    return METHODS


def _doc_rows() -> dict[tuple[str, str], dict]:
    rows = {}
    for line in (REPO / "docs" / "recipes.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 6 or not cells[1].startswith("`"):
            continue
        values = {}
        for pair in cells[2].strip("`").split("`, `"):
            key, _, value = pair.partition(": ")
            values[key] = json.loads(value)
        rows[(cells[0].strip("`"), cells[1].strip("`"))] = {"values": values, "source": cells[3], "needs": cells[4]}
    return rows


def test_the_docs_table_is_every_preset_exactly():
    rows = _doc_rows()
    code = {}
    for entry in _methods():
        for name, preset in getattr(entry.config, "PRESETS", {}).items():
            code[(entry.name, name)] = preset
    assert set(rows) == set(code) and len(code) >= 15
    for key, preset in code.items():
        assert rows[key]["values"] == preset.values, key
        assert rows[key]["source"] == preset.source, key
        assert rows[key]["needs"] == ", ".join(f"`{n}`" for n in preset.needs), key


def _needs(need: str, tmp_path: Path) -> object:
    if need == "prior":
        captions = tmp_path / "captions.json"
        captions.write_text(json.dumps({"annotations": [{"caption": "a dog"}, {"caption": "a red bus"}]}))
        return {"path": str(captions)}
    folder = tmp_path / need
    folder.mkdir(exist_ok=True)
    return str(folder)


def test_every_preset_validates_to_its_values(tmp_path):
    for entry in _methods():
        for name, preset in getattr(entry.config, "PRESETS", {}).items():
            given = {need: _needs(need, tmp_path) for need in preset.needs}
            cfg = entry.config.model_validate({"preset": name, **given})
            assert cfg.preset == name
            for key, value in preset.values.items():
                got = getattr(cfg, key)
                if isinstance(value, dict) and not isinstance(got, dict):  # a nested config (meta's sets)
                    got = {k: getattr(got, k) for k in value}
                assert got == value, (name, key, got, value)


def test_fields_beside_a_preset_override_it():
    from methods.erasers.esd import ESDConfig
    from methods.erasers.meta import MetaConfig

    esd = ESDConfig.model_validate({"preset": "esd-sdxl", "lr": 1e-4})
    assert (esd.lr, esd.eta, esd.start_guidance) == (1e-4, 0.0, 2.0)
    meta = MetaConfig.model_validate(
        {
            "preset": "meta-nudity-as-run",
            "gamma2_3": 0.5,
            "method_config": {"iterations": 7},
            "related": {"images_per_prompt": 2},
        }
    )
    assert (meta.gamma2_1, meta.gamma2_2, meta.gamma2_3) == (0.01, 1.0, 0.5)
    inner = meta.inner()  # the wrapped ESD: its own preset, then the override
    assert (inner.preset, inner.eta, inner.variant, inner.xt_from, inner.iterations) == (
        "esd-meta",
        3.0,
        "full",
        "student",
        7,
    )
    assert meta.related.prompts == ["woman"] and meta.related.images_per_prompt == 2
    with pytest.raises(ValueError, match=r"preset: unknown recipe 'esd-z' \(known: esd-meta, esd-sdxl"):
        ESDConfig.model_validate({"preset": "esd-z"})
