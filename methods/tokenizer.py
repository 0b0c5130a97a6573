"""Stable Diffusion's CLIP BPE tokenizer, built offline from the vocabulary file open_clip ships.

Recipe (docs/background.md §5): merges = lines[1:48895] of `bpe_simple_vocab_16e6.txt.gz`; vocab = the 256
byte characters, the same with `</w>`, every merge joined, then `<|startoftext|>` and `<|endoftext|>`
(49,408 entries). transformers' `CLIPTokenizer` over those files gives SD's ids (bos 49406, eos = pad 49407).
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer

VOCAB_SIZE = 49408
MAX_LENGTH = 77  # CLIP's context length, in tokens


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@functools.cache
def _tokenizer_files() -> tuple[str, str]:
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB_SIZE, len(vocab)  # invariant of the shipped file, not user input
    out = Path(tempfile.mkdtemp(prefix="resurgence-clip-bpe-"))
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return os.fspath(out / "vocab.json"), os.fspath(out / "merges.txt")


def clip_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """SD v1.x's tokenizer; SDXL's second tokenizer pads with "!" instead of `<|endoftext|>`. The toy
    model uses a shorter context (its captions are a few words; attention cost grows with length)."""
    vocab, merges = _tokenizer_files()
    return CLIPTokenizer(vocab, merges, pad_token=pad_token, model_max_length=max_length)
