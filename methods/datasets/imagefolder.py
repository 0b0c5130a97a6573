"""`imagefolder`: images and their captions in a folder, listed by a metadata.jsonl (Hugging Face's convention)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from methods.datasets.base import DATASETS, CaptionedImages, DataContext, to_pixels


class ImageFolderConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str  # folder holding the images and metadata.jsonl
    caption_column: str = "text"  # key of the caption in each metadata line
    limit: int | None = Field(None, ge=1)  # use only the first N images

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str) -> str:
        folder = Path(os.path.expanduser(v))
        if not (folder / "metadata.jsonl").is_file():
            raise ValueError(f"{v}: no such folder with a metadata.jsonl")
        return v


def read_metadata(folder: Path, caption_column: str) -> list[tuple[Path, str]]:
    rows = []
    for n, line in enumerate((folder / "metadata.jsonl").read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rows.append((folder / rec["file_name"], str(rec[caption_column])))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{folder}/metadata.jsonl line {n}: needs file_name and {caption_column!r} ({err})"
            ) from None
    return rows


@DATASETS.register(
    "imagefolder",
    config=ImageFolderConfig,
    description="images + metadata.jsonl captions in a folder (HF imagefolder convention)",
)
def image_folder(cfg: ImageFolderConfig, ctx: DataContext) -> CaptionedImages:
    rows = read_metadata(Path(os.path.expanduser(cfg.path)), cfg.caption_column)[: cfg.limit]
    missing = [str(p) for p, _ in rows if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images listed in metadata.jsonl are missing, e.g. {missing[0]}")
    images = [Image.open(p) for p, _ in rows]
    return CaptionedImages(to_pixels(images, ctx.resolution), [c for _, c in rows])
