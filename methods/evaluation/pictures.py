"""The sample grids people look at: one row per stage of a trial, one column per concept."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from methods.datasets.base import to_images

MIN_CELL = 128  # px: a cell smaller than this is upscaled (nearest: the pixels stay sharp, nothing is invented)


def save_grid(rows: list[tuple[str, list[torch.Tensor]]], columns: list[str], path: Path, scale: int = 1) -> Path:
    """A labelled PNG grid: one row per stage (e.g. base / erased / fine-tuned), one column per concept.
    Images are upscaled by an integer factor (at least `scale`) until a cell is MIN_CELL px or more."""
    images = [[to_images(img.unsqueeze(0))[0] for img in row] for _, row in rows]
    width = max(img.width for row in images for img in row)
    side = width * max(scale, -(-MIN_CELL // width))
    label_w, head_h = 90, 14
    grid = Image.new("RGB", (label_w + side * len(columns), head_h + side * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(columns):
        draw.text((label_w + j * side + 2, 1), name[: max(4, side // 6)], fill="black")
    for i, ((label, _), row) in enumerate(zip(rows, images, strict=True)):
        draw.text((2, head_h + i * side + side // 2 - 5), label, fill="black")
        for j, img in enumerate(row):
            grid.paste(img.resize((side, side), Image.Resampling.NEAREST), (label_w + j * side, head_h + i * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
