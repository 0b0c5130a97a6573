"""`generated`: images the base model draws from a prompt list, cached on disk; `concept`: the erased concept's
own images drawn that way (the relearning attack)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from methods.datasets.base import DATASETS, CaptionedImages, DataContext, cache_key, to_images
from methods.datasets.imagefolder import ImageFolderConfig, image_folder


class GeneratedConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompts: list[str] = Field(min_length=1)  # what the base model draws; each prompt is also the caption
    images_per_prompt: int = Field(4, ge=1)
    steps: int = Field(25, ge=1)  # DDIM steps per image
    guidance_scale: float = Field(7.5, ge=0)
    seed: int = 0  # image i of prompt p uses seed + i (independent of p, as common random numbers)


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
