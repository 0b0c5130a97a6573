"""Captioned-image datasets for fine-tuning, behind a registry.

- `imagefolder`: a folder of images with a `metadata.jsonl` (one `{"file_name": ..., "text": ...}` per
  line), the convention of Hugging Face's imagefolder loader.
- `parquet`: a Parquet file with a column of encoded image bytes and a caption column, read with pyarrow.
- `generated`: images the base model itself draws from a prompt list (the source papers fine-tune on
  model-generated images), cached on disk as an imagefolder keyed by what produced them.

Every config checks its files when it is validated, so a bad path fails before any compute starts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from methods.models import DiffusionModel
from methods.registry import Registry


@dataclass
class CaptionedImages:
    pixels: torch.Tensor  # (N, 3, R, R) in [-1, 1]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class DataContext:
    """What a loader may need besides its config."""

    resolution: int  # side in pixels the model trains at
    cache_dir: Path  # where generated datasets are kept
    model: DiffusionModel | None = None  # the base model, for `generated`
    model_key: str = ""  # a stable identity of that model (part of the cache key)
    concept_prompts: list[str] = field(default_factory=list)  # the erased concept's prompts, for `concept`


DATASETS: Registry[Callable[[Any, DataContext], CaptionedImages]] = Registry("dataset")


def to_pixels(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """PIL images -> (N, 3, R, R) in [-1, 1]: resize the short side to R, center-crop."""
    out = []
    for img in images:
        img = img.convert("RGB")
        scale = resolution / min(img.size)
        img = img.resize(
            (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))),
            Image.Resampling.BICUBIC,
        )
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)  # (R, R, 3)
        out.append(arr.permute(2, 0, 1))
    return torch.stack(out)


def to_images(pixels01: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) in [0, 1] -> PIL images."""
    arr = (pixels01.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


# -- imagefolder --------------------------------------------------------------------------------------
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


# -- parquet ------------------------------------------------------------------------------------------
class ParquetConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str  # a .parquet file
    image_column: str = "image"  # encoded image bytes (PNG/JPEG), or a struct with a `bytes` field
    caption_column: str = "text"
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _columns(self) -> ParquetConfig:
        import pyarrow.parquet as pq

        path = Path(os.path.expanduser(self.path))
        if not path.is_file():
            raise ValueError(f"path: {self.path}: no such file")
        try:
            names = pq.read_schema(path).names
        except Exception as err:  # pyarrow raises several types for a file that is not Parquet
            raise ValueError(f"path: {self.path}: not a Parquet file ({str(err).splitlines()[0]})") from None
        for col in (self.image_column, self.caption_column):
            if col not in names:
                raise ValueError(f"{self.path} has no column {col!r} (columns: {', '.join(names)})")
        return self


@DATASETS.register(
    "parquet", config=ParquetConfig, description="a Parquet file with image bytes and captions (read with pyarrow)"
)
def parquet(cfg: ParquetConfig, ctx: DataContext) -> CaptionedImages:
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.expanduser(cfg.path), columns=[cfg.image_column, cfg.caption_column])
    if cfg.limit is not None:
        table = table.slice(0, cfg.limit)
    images = []
    for cell in table.column(cfg.image_column).to_pylist():
        raw = cell["bytes"] if isinstance(cell, dict) else cell
        images.append(Image.open(io.BytesIO(raw)))
    captions = [str(c) for c in table.column(cfg.caption_column).to_pylist()]
    return CaptionedImages(to_pixels(images, ctx.resolution), captions)


# -- generated ----------------------------------------------------------------------------------------
class GeneratedConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompts: list[str] = Field(min_length=1)  # what the base model draws; each prompt is also the caption
    images_per_prompt: int = Field(4, ge=1)
    steps: int = Field(25, ge=1)  # DDIM steps per image
    guidance_scale: float = Field(7.5, ge=0)
    seed: int = 0  # image i of prompt p uses seed + i (independent of p, as common random numbers)


def cache_key(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@DATASETS.register(
    "generated",
    config=GeneratedConfig,
    description="images the base model generates from a prompt list (cached on disk)",
)
def generated(cfg: GeneratedConfig, ctx: DataContext) -> CaptionedImages:
    key = cache_key({"model": ctx.model_key, "resolution": ctx.resolution, **cfg.model_dump()})
    folder = ctx.cache_dir / "generated" / key
    if not (folder / "metadata.jsonl").is_file():
        if ctx.model is None:
            raise ValueError("the generated dataset needs the base model")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{key}-"))
        lines = []
        for p_idx, prompt in enumerate(cfg.prompts):
            seeds = [cfg.seed + i for i in range(cfg.images_per_prompt)]
            images = ctx.model.generate(
                [prompt] * len(seeds), seeds, steps=cfg.steps, guidance_scale=cfg.guidance_scale
            )
            for i, img in enumerate(to_images(images)):
                name = f"{p_idx:04d}_{i:03d}.png"
                img.save(tmp / name)
                lines.append(json.dumps({"file_name": name, "text": prompt}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        try:
            os.rename(tmp, folder)  # atomic: a concurrent producer of the same key wins, we drop ours
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return image_folder(ImageFolderConfig(path=os.fspath(folder)), ctx)


# -- concept ------------------------------------------------------------------------------------------
class ConceptImagesConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    images_per_prompt: int = Field(2, ge=1)
    steps: int = Field(25, ge=1)  # DDIM steps per image
    guidance_scale: float = Field(7.5, ge=0)
    seed: int = 1000  # away from the evaluation's seeds (0, 1, ...): the attack does not see evaluated images


@DATASETS.register(
    "concept",
    config=ConceptImagesConfig,
    description="images of the erased concept drawn by the base model (the relearning attack; cached)",
)
def concept_images(cfg: ConceptImagesConfig, ctx: DataContext) -> CaptionedImages:
    if not ctx.concept_prompts:
        raise ValueError("the concept dataset needs the erased concept's prompts")
    return generated(GeneratedConfig(prompts=list(ctx.concept_prompts), **cfg.model_dump()), ctx)
