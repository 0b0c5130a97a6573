"""Golden test of MACE stage 1 (closed-form refinement, paper eq. 5) against an independent float64 computation.

Everything the expected weights depend on is computed here, following the official code (Shilin-LU/MACE,
src/cfr_utils.py: find_matching_indices, prepare_k_v, closed_form_refinement), without the project's helpers
(no mace.matching_positions / mapped_prompt / preservation_cache, nothing from xattn but the list of layers):

- token alignment: common prefix, then common suffix (end token included) of the unpadded token ids of the
  prompt and of the prompt with the concept's name replaced by the mapping, then the padding positions
  (the longer prompt's pads up to the context length, the shorter's as many);
- c: the text encoder's last hidden state of the prompt padded to the context length, at the aligned positions;
  c*: the mapped prompt's at the matching positions;
- per K/V projection: W_new = (sum W c* c^T + S K1 + lamb W) (sum c c^T + S K2 + lamb I)^-1, with
  (K1, K2) = (sum (W c) c^T, sum c c^T) over every token of the preservation prompts and S the cache weight
  (train_preserve_scale squared when `train_scale_squared`, as the official code applies it twice).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import pytest
import torch

from methods.erasers import mace, xattn
from methods.erasers.base import Concept
from methods.models import DiffusionModel

# Tolerances, each relative to the largest entry of the reference; measured on CPU float32 (torch 2, tiny-sd seed 0):
# - BACKWARD: W_project M2 vs M1, with M1, M2 the golden float64 normal equations of eq. 5: the project's weights
#   solve them up to the float32 rounding of its sums. Measured <= 7.5e-7; the case (c) shift and the once/twice
#   scale swap give >= 5.4e-3.
# - WEIGHT: the weights themselves. M2 is ill-conditioned (cond ~2e4 with lamb 0.5, ~1e6 with lamb 0: the 60-odd
#   padding tokens of each prompt are nearly identical), which amplifies the float32 rounding of the sums into
#   the weights: measured <= 2.5e-3 (a float32-summed copy of the golden formula agrees with the project within
#   5e-8, so this is rounding, not a formula difference); the perturbations move them by >= 0.38.
# - OUTPUT: W c on the refined tokens. Measured <= 1.8e-4; the perturbations give >= 6.1e-2.
BACKWARD, WEIGHT, OUTPUT = 2e-5, 1e-2, 2e-3


# -- the independent reference --------------------------------------------------------------------------------
def _aligned_positions(tokenizer, old_text: str, new_text: str, shift: int = 0) -> tuple[list[int], list[int]]:
    """Official find_matching_indices + prepare_k_v's padding extension. `shift` pairs old pad k with new pad
    k + shift (a deliberately wrong alignment for the sensitivity check)."""
    old = tokenizer(old_text).input_ids
    new = tokenizer(new_text).input_ids
    start = 0
    for i, j in zip(old, new, strict=False):
        if i != j:
            break
        start += 1
    end_old, end_new = len(old) - 1, len(new) - 1
    while end_old >= start and end_new >= start and old[end_old] == new[end_new]:
        end_old -= 1
        end_new -= 1
    o = list(range(start)) + list(range(end_old + 1, len(old)))
    n = list(range(start)) + list(range(end_new + 1, len(new)))
    length = tokenizer.model_max_length
    last_o, last_n = o[-1], n[-1]
    if last_o >= last_n:
        pad_o = list(range(last_o + 1, length))
        pad_n = list(range(last_n + 1, length - (last_o - last_n)))
    else:
        pad_n = list(range(last_n + 1, length))
        pad_o = list(range(last_o + 1, length - (last_n - last_o)))
    assert len(pad_o) == len(pad_n) and len(o) == len(n)
    if shift:
        pad_o, pad_n = pad_o[: len(pad_o) - shift], pad_n[shift:]
    return o + pad_o, n + pad_n


@torch.no_grad()
def _hidden(model: DiffusionModel, prompts: list[str]) -> torch.Tensor:
    """(N, L, D) float64: the text encoder's last hidden state of each prompt padded to max length."""
    tok = model.pipe.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    enc = model.pipe.text_encoder
    return enc(ids.input_ids.to(enc.device))[0].detach().double().cpu()


def _layers(model: DiffusionModel) -> dict[str, torch.nn.Linear]:
    """Every transformer block's attn2.to_k / attn2.to_v, found here; checked against xattn.kv_projections."""
    out = {}
    for block_name, block in model.unet.named_modules():
        if block.__class__.__name__ == "BasicTransformerBlock":
            out[f"unet.{block_name}.attn2.to_k"] = block.attn2.to_k
            out[f"unet.{block_name}.attn2.to_v"] = block.attn2.to_v
    return out


def _pairs(model: DiffusionModel, concepts: list[Concept], mapping: str, shift: int = 0):
    """Concatenated (c, c*) over every prompt of every concept: (T, D) float64 each."""
    cs, cns = [], []
    for concept in concepts:
        mapped = [p.replace(concept.name, mapping) for p in concept.prompts]
        e_old, e_new = _hidden(model, concept.prompts), _hidden(model, mapped)
        for k, (p, q) in enumerate(zip(concept.prompts, mapped, strict=True)):
            o, n = _aligned_positions(model.pipe.tokenizer, p, q, shift)
            cs.append(e_old[k, o])
            cns.append(e_new[k, n])
    return torch.cat(cs), torch.cat(cns)


def _cache(model: DiffusionModel, prompts: list[str], weights: dict[str, torch.Tensor]):
    """float64 (K1, K2) = (sum (W c) c^T, sum c c^T) over every token (all positions) of `prompts`."""
    c = _hidden(model, prompts).flatten(0, 1)
    k2 = c.T @ c
    return {name: ((c @ w.T).T @ c, k2) for name, w in weights.items()}


class Golden(NamedTuple):
    """Per projection: eq. 5's normal equations W m2 = m1 (float64), their solution, and the refined tokens c."""

    m1: torch.Tensor
    m2: torch.Tensor
    w: torch.Tensor
    c: torch.Tensor


def _expected(model, concepts, mapping, lamb, weights, cache=None, scale=0.0, shift=0) -> dict[str, Golden]:
    c, c_new = _pairs(model, concepts, mapping, shift)
    eye = torch.eye(c.shape[1], dtype=torch.float64)
    out = {}
    for name, w in weights.items():
        m1 = (c_new @ w.T).T @ c + lamb * w
        m2 = c.T @ c + lamb * eye
        if cache is not None:
            m1, m2 = m1 + scale * cache[name][0], m2 + scale * cache[name][1]
        out[name] = Golden(m1, m2, torch.linalg.solve(m2, m1.T).T, c)  # m2 symmetric: m1 m2^-1
    return out


def _full_rank_text(model: DiffusionModel) -> None:
    """Give the tiny text encoder's final LayerNorm a seeded random gain and bias, as a trained CLIP has. Its
    fresh init (gain 1, bias 0) makes every embedding zero-mean, so sum c c^T is exactly singular and eq. 5
    without a ridge (lamb 0) has no unique solution."""
    norm = dict(model.pipe.text_encoder.named_modules())["final_layer_norm"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(norm.weight.shape, generator=g))
        norm.bias.copy_(0.5 * torch.randn(norm.bias.shape, generator=g))


# -- running the project's stage 1 ----------------------------------------------------------------------------
def _originals(model: DiffusionModel) -> dict[str, torch.Tensor]:
    layers = _layers(model)
    assert layers and set(layers) == set(xattn.kv_projections(model)), "the K/V projection sets disagree"
    return {name: m.weight.detach().double().cpu().clone() for name, m in layers.items()}


def _project(model, concepts, cfg, cache64=None) -> dict[str, torch.Tensor]:
    projections = xattn.kv_projections(model)
    device = next(iter(projections.values())).weight.device
    cache = {n: (a.float().to(device), b.float().to(device)) for n, (a, b) in (cache64 or {}).items()}
    mace.closed_form_refinement(model, concepts, cfg, projections, cache)
    return {name: p.weight.detach().double().cpu() for name, p in projections.items()}


def _errors(got: dict[str, torch.Tensor], ref: dict[str, Golden]) -> dict[str, float]:
    """Worst relative errors over the projections: of eq. 5's normal equations, of the weights, of W c."""
    out = {"backward": 0.0, "weight": 0.0, "output": 0.0}
    for name, g in ref.items():
        w = got[name]
        errs = {
            "backward": (w @ g.m2 - g.m1).abs().max() / g.m1.abs().max(),
            "weight": (w - g.w).abs().max() / g.w.abs().max(),
            "output": ((w - g.w) @ g.c.T).abs().max() / (g.w @ g.c.T).abs().max(),
        }
        out = {k: max(out[k], errs[k].item()) for k in out}
    return out


def _assert_match(got: dict[str, torch.Tensor], ref: dict[str, Golden]) -> None:
    assert set(got) == set(ref)
    for name, g in ref.items():
        w = got[name]
        for what, a, b, tol in (
            ("normal equations", w @ g.m2, g.m1, BACKWARD),
            ("weights", w, g.w, WEIGHT),
            ("outputs on the refined tokens", w @ g.c.T, g.w @ g.c.T, OUTPUT),
        ):
            torch.testing.assert_close(
                a, b, rtol=0, atol=tol * b.abs().max().item(), msg=lambda m, n=name, x=what: f"{n}, {x}: {m}"
            )


def _weights(ref: dict[str, Golden]) -> dict[str, torch.Tensor]:
    return {name: g.w for name, g in ref.items()}


# -- cases ----------------------------------------------------------------------------------------------------
MAPPING_A = "a big boat"  # 3 tokens
CONCEPTS_A = [
    Concept("ship", ["ship in a harbor at dawn", "a photo of a ship on the sea"]),  # 1 token: start, middle
    Concept("zebrafish", ["zebrafish swimming in a tank", "a small zebrafish near the rocks"]),  # 2 sub-words
]
MAPPING_B = "a person"  # 2 tokens
CONCEPTS_B = [  # 6 sub-words: the original prompt is the longer one (the other padding branch)
    Concept("Timothée Chalamet", ["Timothée Chalamet on a red carpet", "a portrait of Timothée Chalamet smiling"])
]
PRESERVE_B, SCALE_B = ["a red square on a table", "a cat sleeping on the sofa"], 0.3


def _case_b(model: DiffusionModel, squared: bool, shift: int = 0, swap: bool = False):
    """(weights before, golden) of case (b); `swap` uses the other scale (once <-> twice)."""
    _full_rank_text(model)
    weights = _originals(model)
    cache = _cache(model, PRESERVE_B, weights)
    scale = SCALE_B**2 if squared != swap else SCALE_B
    return weights, cache, _expected(model, CONCEPTS_B, MAPPING_B, 0.0, weights, cache, scale, shift)


def test_alignment_matches_the_official_example(tiny_sd):
    """The reference alignment itself on hand-checked cases: <s> a photo of a [ship] on the sea </s> vs
    <s> a photo of a [a big boat] on the sea </s>: shared prefix, shared suffix + end, then the pads; and a
    name longer than its mapping (the other padding branch)."""
    tok = tiny_sd.pipe.tokenizer
    assert tok.model_max_length == 77
    o, n = _aligned_positions(tok, "a photo of a ship on the sea", "a photo of a a big boat on the sea")
    assert o[:9] == [0, 1, 2, 3, 4, 6, 7, 8, 9] and n[:9] == [0, 1, 2, 3, 4, 8, 9, 10, 11]
    assert o[9:] == list(range(10, 75)) and n[9:] == list(range(12, 77))
    o, n = _aligned_positions(tok, "Timothée Chalamet smiling", "a person smiling")
    assert o == [0, 7, 8] + list(range(9, 77)) and n == [0, 3, 4] + list(range(5, 73))
    o, n = _aligned_positions(tok, "Timothée Chalamet smiling", "a person smiling", shift=1)
    assert o == [0, 7, 8] + list(range(9, 76)) and n == [0, 3, 4] + list(range(6, 73))


def test_refinement_two_concepts_lamb(tiny_sd):
    """(a) two concepts, name at the start and in the middle, mapping longer than the name (1 and 2 sub-words
    -> 3 tokens), lamb 0.5, no cache."""
    weights = _originals(tiny_sd)
    ref = _expected(tiny_sd, CONCEPTS_A, MAPPING_A, 0.5, weights)
    got = _project(tiny_sd, CONCEPTS_A, mace.MACEConfig(mapping=MAPPING_A, lamb=0.5))
    assert _errors(weights, ref)["weight"] > 100 * WEIGHT  # the refinement moves W by far more than the tolerance
    _assert_match(got, ref)


@pytest.mark.parametrize("squared", [True, False])
def test_refinement_with_preservation_cache(tiny_sd, squared):
    """(b) the celebrity setting: lamb 0, a preservation cache of two prompts, train_preserve_scale 0.3 applied
    twice (official, S = 0.09) or once (S = 0.3); the other S's weights would fail the comparison."""
    weights, cache, ref = _case_b(tiny_sd, squared)
    other = _case_b(copy.deepcopy(tiny_sd), squared, swap=True)[2]
    cfg = mace.MACEConfig(mapping=MAPPING_B, lamb=0.0, train_preserve_scale=SCALE_B, train_scale_squared=squared)
    got = _project(tiny_sd, CONCEPTS_B, cfg, cache)
    _assert_match(got, ref)
    with pytest.raises(AssertionError):
        _assert_match(_weights(other), ref)


def test_squared_and_single_scale_differ(_tiny_sd):
    """(b) the project's own results for train_scale_squared True and False differ by far more than the
    tolerance."""
    results = []
    for squared in (True, False):
        model = copy.deepcopy(_tiny_sd)
        _, cache, ref = _case_b(model, squared)
        cfg = mace.MACEConfig(mapping=MAPPING_B, lamb=0.0, train_preserve_scale=SCALE_B, train_scale_squared=squared)
        results.append((_project(model, CONCEPTS_B, cfg, cache), ref))
    (true_w, true_ref), (false_w, _) = results
    errs = _errors(false_w, true_ref)
    assert errs["backward"] > 100 * BACKWARD and errs["weight"] > 10 * WEIGHT, errs


def test_alignment_perturbation_is_detectable(tiny_sd):
    """(c) the golden comparison can fail: pairing each old pad with the next new pad (a one-position shift)
    changes the expected weights by far more than every tolerance, in both cases."""
    weights = _originals(tiny_sd)
    right = _expected(tiny_sd, CONCEPTS_A, MAPPING_A, 0.5, weights)
    shifted = _weights(_expected(tiny_sd, CONCEPTS_A, MAPPING_A, 0.5, weights, shift=1))
    errs = _errors(shifted, right)
    assert errs["backward"] > 100 * BACKWARD and errs["weight"] > 10 * WEIGHT and errs["output"] > 10 * OUTPUT, errs
    with pytest.raises(AssertionError):
        _assert_match(shifted, right)
    right = _case_b(tiny_sd, True)[2]
    shifted = _weights(_case_b(tiny_sd, True, shift=1)[2])
    errs = _errors(shifted, right)
    assert errs["backward"] > 100 * BACKWARD and errs["weight"] > 10 * WEIGHT and errs["output"] > 10 * OUTPUT, errs


def test_erase_weighs_prior_and_domain_as_the_official_cache(tiny_sd, tmp_path):
    """erase() with stage 1 only (steps 0): the cache is the prior captions' + preserve_weight x the domain's
    (the experiment's other concepts), times train_preserve_scale squared (src/cfr_lora_training.py)."""
    import json

    from methods.erasers.base import EraseRequest
    from methods.evaluation.prompts import PromptSetConfig

    _full_rank_text(tiny_sd)
    weights = _originals(tiny_sd)
    captions = ["a dog on a sofa", "two red buses in the rain", "a bowl of fruit"]
    (tmp_path / "captions.json").write_text(json.dumps({"annotations": [{"caption": c} for c in captions]}))
    domain = ["a red square on a table", "a cat sleeping on the sofa"]
    prior_cache, domain_cache = _cache(tiny_sd, captions, weights), _cache(tiny_sd, domain, weights)
    pw, s = 4.0, 0.3
    cache = {
        n: (prior_cache[n][0] + pw * domain_cache[n][0], prior_cache[n][1] + pw * domain_cache[n][1]) for n in weights
    }
    ref = _expected(tiny_sd, CONCEPTS_B, MAPPING_B, 0.0, weights, cache, s**2)
    cfg = mace.MACEConfig(
        mapping=MAPPING_B,
        lamb=0.0,
        steps=0,
        train_preserve_scale=s,
        preserve_weight=pw,
        prior=PromptSetConfig(path=str(tmp_path / "captions.json")),
    )
    mace.erase(tiny_sd, EraseRequest(targets=CONCEPTS_B, preserve=[Concept("square", domain)]), cfg)
    got = {n: p.weight.detach().double().cpu() for n, p in xattn.kv_projections(tiny_sd).items()}
    _assert_match(got, ref)
    prior_only = {n: prior_cache[n] for n in weights}  # the domain's weight matters
    with pytest.raises(AssertionError):
        _assert_match(got, _expected(tiny_sd, CONCEPTS_B, MAPPING_B, 0.0, weights, prior_only, s**2))
