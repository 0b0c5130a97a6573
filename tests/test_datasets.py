import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from methods.datasets.base import DATASETS, DataContext
from methods.datasets.generated import GeneratedConfig
from methods.datasets.imagefolder import ImageFolderConfig
from methods.datasets.parquet import ParquetConfig


def _png(color) -> Image.Image:
    return Image.new("RGB", (40, 24), color)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    lines = []
    for i, color in enumerate(["red", "blue", "green"]):
        _png(color).save(d / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a {color} box"}))
    (d / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_imagefolder(folder, tmp_path):
    ctx = DataContext(resolution=16, cache_dir=tmp_path)
    data = DATASETS.get("imagefolder").obj(ImageFolderConfig(path=str(folder)), ctx)
    assert data.captions == ["a red box", "a blue box", "a green box"]
    assert data.pixels.shape == (3, 3, 16, 16)  # short side resized, center crop
    red = data.pixels[0, :, 8, 8]
    assert red[0] > 0.9 and red[1] < -0.9 and red[2] < -0.9  # [-1, 1] range, red stays red


def test_parquet(tmp_path):
    blobs = []
    for color in ["red", "blue"]:
        buf = io.BytesIO()
        _png(color).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    table = pa.table({"image": pa.array(blobs, pa.binary()), "caption": ["r", "b"]})
    pq.write_table(table, tmp_path / "d.parquet")
    cfg = ParquetConfig(path=str(tmp_path / "d.parquet"), caption_column="caption")
    data = DATASETS.get("parquet").obj(cfg, DataContext(resolution=8, cache_dir=tmp_path))
    assert data.captions == ["r", "b"] and data.pixels.shape == (2, 3, 8, 8)
    assert data.pixels[1, 2].mean() > 0.9  # blue
    with pytest.raises(ValidationError, match="no column 'text'"):
        ParquetConfig(path=str(tmp_path / "d.parquet"))


def test_file_errors_are_caught_at_validation(tmp_path):
    with pytest.raises(ValidationError, match="metadata.jsonl"):
        ImageFolderConfig(path=str(tmp_path / "nope"))
    with pytest.raises(ValidationError, match="no such file"):
        ParquetConfig(path=str(tmp_path / "nope.parquet"))
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(ValidationError, match="not a Parquet file"):
        ParquetConfig(path=str(tmp_path / "x.parquet"))


def test_generated_is_cached_on_disk(tiny_sd, tmp_path):
    cfg = GeneratedConfig(prompts=["a dog", "a cat"], images_per_prompt=2, steps=2)
    ctx = DataContext(resolution=tiny_sd.resolution, cache_dir=tmp_path, model=tiny_sd, model_key="tiny")
    first = DATASETS.get("generated").obj(cfg, ctx)
    assert first.captions == ["a dog", "a dog", "a cat", "a cat"]
    # the second load needs no model: it reads the cached folder
    again = DATASETS.get("generated").obj(
        cfg, DataContext(resolution=tiny_sd.resolution, cache_dir=tmp_path, model=None, model_key="tiny")
    )
    assert torch.allclose(first.pixels, again.pixels)
    assert len(list((tmp_path / "generated").iterdir())) == 1
    # another model identity is another cache entry
    with pytest.raises(ValueError, match="needs the base model"):
        DATASETS.get("generated").obj(
            cfg, DataContext(resolution=tiny_sd.resolution, cache_dir=tmp_path, model=None, model_key="other")
        )
