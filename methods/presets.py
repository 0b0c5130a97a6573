"""Named recipes: a method config's `preset` fills in the values of an official recipe.

A config class that mixes in `Presets` lists its recipes in `PRESETS`; `{preset: mace-celebrity, lr: 2e-4}`
takes every value of the recipe and then the fields written beside it (so a preset is a starting point, and
what was changed is visible in the spec). The preset's name stays in the config, so it reaches the trial's
params and the erase cache's address with the values it stands for. A recipe that needs something only the
user can give (a folder of real images, a COCO captions file) names those fields in `needs`, and a config
without them is refused.

Each recipe names the official file its values come from and says where the project departs from it;
docs/recipes.md writes the same values in one table (tests/test_presets.py keeps the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, model_validator


@dataclass(frozen=True)
class Preset:
    values: dict[str, Any]  # config field -> the recipe's value
    source: str  # the official repository and file the values come from
    needs: tuple[str, ...] = ()  # fields the user must give (paths); refused when missing
    note: str = ""  # what differs from the official code, and why


class Presets(BaseModel):
    """Mixin: a `preset` field resolved before validation."""

    PRESETS: ClassVar[dict[str, Preset]] = {}

    preset: str | None = None  # an official recipe by name (see docs/recipes.md); other fields override it

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        name = data["preset"]
        recipe = cls.PRESETS.get(name) if isinstance(name, str) else None
        if recipe is None:
            known = ", ".join(sorted(cls.PRESETS)) or "none"
            raise ValueError(f"preset: unknown recipe {name!r} (known: {known})")
        merged = {**recipe.values, **data}
        for key, value in recipe.values.items():  # a nested config (meta's method_config) merges key by key
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                merged[key] = {**value, **data[key]}
        for need in recipe.needs:
            if merged.get(need) in (None, "", [], {}):
                raise ValueError(f"{need}: the {name} recipe needs it ({recipe.source})")
        return merged
