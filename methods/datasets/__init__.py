"""Captioned-image datasets for fine-tuning, one file each behind a registry (`base.py`):

- `imagefolder.py`: a folder of images with a `metadata.jsonl` (one `{"file_name": ..., "text": ...}` per
  line), the convention of Hugging Face's imagefolder loader.
- `parquet.py`: a Parquet file with a column of encoded image bytes and a caption column, read with pyarrow.
- `generated.py`: images the base model itself draws from a prompt list (the source papers fine-tune on
  model-generated images), cached on disk as an imagefolder keyed by what produced them; and `concept`, the
  erased concept's own images drawn that way (the relearning attack).

Every config checks its files when it is validated, so a bad path fails before any compute starts.
"""
