"""Cross-attention helpers shared by the closed-form editors (UCE, MACE): the K/V projections they edit,
token embeddings and positions, the ridge solve, and a processor that records cross-attention maps.

Shapes: SD v1.4 has 16 cross-attention blocks, i.e. 32 K/V matrices 768 -> {320, 640, 1280}; SDXL has 70
blocks, 140 K/V matrices 2048 -> {640, 1280} (docs/background.md §2). The text side of every K/V is the
conditioning `DiffusionModel.encode` returns (SDXL: both encoders' penultimate layers concatenated).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from methods.models import DiffusionModel


def kv_projections(model: DiffusionModel, with_to_k: bool = True) -> dict[str, torch.nn.Linear]:
    """Every cross-attention key/value projection, by model-wide parameter name prefix ("unet.<module>")."""
    suffixes = ("attn2.to_k", "attn2.to_v") if with_to_k else ("attn2.to_v",)
    return {
        f"unet.{name}": module
        for name, module in model.unet.named_modules()
        if name.endswith(suffixes) and isinstance(module, torch.nn.Linear)
    }


def token_ids(model: DiffusionModel, prompt: str) -> list[int]:
    """A prompt's token ids with <|startoftext|> and <|endoftext|>, unpadded, truncated as the encoder sees it."""
    tok = model.pipe.tokenizer
    return tok(prompt, truncation=True, max_length=tok.model_max_length).input_ids


def token_counts(model: DiffusionModel, prompts: list[str]) -> list[int]:
    """Tokens of each prompt including <|startoftext|> and <|endoftext|>."""
    return [len(token_ids(model, p)) for p in prompts]


@torch.no_grad()
def embeddings(model: DiffusionModel, prompts: list[str]) -> torch.Tensor:
    """(N, L, D) fp32 text conditioning of each prompt: the input of every K/V projection."""
    return model.encode(prompts).prompt_embeds.float()


def word_positions(model: DiffusionModel, prompt: str, word: str) -> list[int]:
    """Token positions (with <|startoftext|> at 0) of `word`'s sub-word tokens inside `prompt`; [] if absent."""
    ids = token_ids(model, prompt)
    span = model.pipe.tokenizer(word, add_special_tokens=False).input_ids
    for start in range(1, len(ids) - len(span) + 1):
        if span and ids[start : start + len(span)] == span:
            return list(range(start, start + len(span)))
    return []


def ridge_solve(m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """W = m1 @ inverse(m2) for a symmetric m2 (d_in x d_in), computed as a linear solve in fp64; a
    pseudo-inverse when m2 is singular (no ridge and too few tokens)."""
    a, b = m1.double(), m2.double()
    try:
        return torch.linalg.solve(b, a.T).T.float()  # b symmetric: (b^-1 a^T)^T = a b^-1
    except torch.linalg.LinAlgError:
        return (a @ torch.linalg.pinv(b, hermitian=True)).float()


class _MapRecorder:
    """Attention processor for `attn2` that computes the attention probabilities explicitly (SDPA does not
    expose them) and hands them to `sink`: (B, heads, HW, L) after the softmax."""

    def __init__(self, sink: list[torch.Tensor]) -> None:
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):  # noqa: ANN001
        b = hidden_states.shape[0]
        spatial = hidden_states.ndim == 4
        if spatial:  # (B, C, H, W) -> (B, HW, C)
            _, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*heads, HW, L)
        self.sink.append(probs.view(b, attn.heads, *probs.shape[1:]))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        if attn.residual_connection:
            raise NotImplementedError("cross-attention with a residual connection")
        return out / attn.rescale_output_factor


@contextmanager
def attention_maps(model: DiffusionModel) -> Iterator[list[torch.Tensor]]:
    """Within the block, every UNet forward appends each cross-attention layer's probabilities
    (B, heads, HW, L) to the yielded list; the original processors come back afterwards."""
    sink: list[torch.Tensor] = []
    saved = model.unet.attn_processors
    recorder = _MapRecorder(sink)
    model.unet.set_attn_processor({k: (recorder if ".attn2." in k else v) for k, v in saved.items()})
    try:
        yield sink
    finally:
        model.unet.set_attn_processor(saved)
