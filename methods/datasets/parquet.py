"""`parquet`: a Parquet file of encoded images and captions, read with pyarrow."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from methods.datasets.base import DATASETS, CaptionedImages, DataContext, to_pixels


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
