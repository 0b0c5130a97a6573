import pytest
import torch

from methods.erasers import uce, xattn
from methods.erasers.base import Concept, EraseRequest
from tests.conftest import changed, state


def _kv(model):
    return {n: m.weight.detach().clone() for n, m in xattn.kv_projections(model).items()}


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("tokens", ["last", "all"])
def test_uce_is_the_least_squares_edit(tiny_sd, tiny_sdxl, family, tokens):
    """With one token per prompt (`last`) the constraints are compatible and hold: erased tokens read as
    the guide, preserved ones are unchanged. With every token (`all`, more constraints than dimensions) the
    edit is the minimiser of eq. 7's objective: its gradient vanishes."""
    model = tiny_sd if family == "sd" else tiny_sdxl
    before, te = _kv(model), state(model.pipe.text_encoder)
    unet_before = state(model.unet)
    request = EraseRequest(
        targets=[Concept("circle", ["a circle", "a red circle"])],
        preserve=[Concept("square", ["a square", "a blue square"])],
    )
    cfg = uce.UCEConfig(guide="a photo", tokens=tokens, lamb=0.01)
    result = uce.erase(model, request, cfg)
    c_e, c_g = uce._pairs(model, cfg.erased_pairs(request), tokens)
    c_p = uce._preserved(model, ["a square", "a blue square"], tokens)
    after = _kv(model)
    for name, w_old in before.items():
        w_new = after[name]
        target, start = c_g @ w_old.T, c_e @ w_old.T
        err = (c_e @ w_new.T - target).norm() / (start - target).norm()
        kept = (c_p @ w_new.T - c_p @ w_old.T).norm() / (c_p @ w_old.T).norm()
        grad = (
            cfg.lamb * (w_new - w_old)
            + cfg.erase_scale * (c_e @ w_new.T - target).T @ c_e
            + cfg.preserve_scale * (c_p @ w_new.T - c_p @ w_old.T).T @ c_p
        )
        assert grad.norm() < 1e-3 * (cfg.erase_scale * (start - target).T @ c_e).norm(), name
        if tokens == "last":
            assert err < 0.05, (name, float(err))  # the erased tokens now read as the guide
            assert kept < 0.05, (name, float(kept))  # the preserved ones did not move
        else:
            assert err < 0.6 and kept < 0.2, (name, float(err), float(kept))
    moved = {f"unet.{k}" for k in changed(unet_before, model.unet)}
    assert moved == set(result.trained) and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in moved)
    assert not changed(te, model.pipe.text_encoder)


def test_uce_shapes_and_defaults(tiny_sd):
    """Default config (lamb 0.5, scales 1): K/V shapes unchanged; to_v only when with_to_k is off."""
    before = _kv(tiny_sd)
    request = EraseRequest(targets=[Concept("circle", ["a circle"])])
    result = uce.erase(tiny_sd, request, uce.UCEConfig(with_to_k=False))
    assert all(".to_v." in n for n in result.trained) and len(result.trained) == len(before) // 2
    after = _kv(tiny_sd)
    assert all(after[n].shape == before[n].shape for n in before)
    assert any(not torch.equal(after[n], before[n]) for n in before if n.endswith("to_v"))
    assert all(torch.equal(after[n], before[n]) for n in before if n.endswith("to_k"))


def test_uce_weights_are_eq7_computed_here(tiny_sd):
    """Eq. 7 solved in the test from the text encoder's own outputs, with the official `last`-token choice
    (each prompt's last sub-word; the "" guide's start token): W = M1 M2^-1 with
    M1 = lamb W_old + a sum_i (W_old c*_i) c_i^T + b sum_j (W_old c_j) c_j^T and
    M2 = lamb I + a sum_i c_i c_i^T + b sum_j c_j c_j^T."""
    model = tiny_sd
    erase, keep = ["a circle", "a red circle"], ["a square", "a blue square"]
    tok, encoder = model.pipe.tokenizer, model.pipe.text_encoder

    @torch.no_grad()
    def last_subword(prompts):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        hidden = encoder(ids)[0].float()  # (N, L, D): what the UNet's cross-attention reads
        lengths = [len(tok(p).input_ids) for p in prompts]  # with <|startoftext|> and <|endoftext|>
        return torch.stack([h[n - 2] for h, n in zip(hidden, lengths, strict=True)])

    c_e, c_p = last_subword(erase), last_subword(keep)
    c_star = last_subword([""])  # n = 2: index 0, the start token
    lamb, a, b = 0.3, 1.0, 0.5
    d = c_e.shape[1]
    m2 = lamb * torch.eye(d) + a * c_e.T @ c_e + b * c_p.T @ c_p
    kv = {
        n: m.weight.detach().float().clone()
        for n, m in model.unet.named_modules()
        if n.endswith(("attn2.to_k", "attn2.to_v"))
    }
    request = EraseRequest(targets=[Concept("circle", erase)], preserve=[Concept("square", keep)])
    uce.erase(model, request, uce.UCEConfig(guide="", lamb=lamb, erase_scale=a, preserve_scale=b))
    edited = dict(model.unet.named_modules())
    assert len(kv) > 0
    for name, w_old in kv.items():
        targets = (c_star @ w_old.T).expand(len(erase), -1)  # every erased token reads as the guide's
        m1 = lamb * w_old + a * targets.T @ c_e + b * (c_p @ w_old.T).T @ c_p
        want = torch.linalg.solve(m2, m1.T).T  # M1 M2^-1 (M2 is symmetric)
        assert torch.allclose(edited[name].weight.float(), want, atol=1e-5, rtol=1e-4), name


def test_uce_paper_era_recipe_is_eq7_over_aligned_tokens(tiny_sd):
    """The paper-era recipe (train_erase.py; preset uce-paper) computed here: the bare names are erased, each
    towards its own guide, with every token from the name's last sub-word on aligned to the guide's from its
    last sub-word on; "" and the others are preserved over all their tokens with b = max(0.1, 1 / 2) = 0.5."""
    model = tiny_sd
    tok, encoder = model.pipe.tokenizer, model.pipe.text_encoder
    names, guides, keep = ["circle", "red square"], ["a photo", "sky"], ["a bar"]

    @torch.no_grad()
    def hidden(prompts):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        return encoder(ids)[0].float()  # (N, L, D)

    length = tok.model_max_length
    olds, news = [], []
    for name, guide in zip(names, guides, strict=True):
        i_o, i_n = len(tok(name).input_ids) - 2, len(tok(guide).input_ids) - 2
        far = max(i_o, i_n)
        olds.append(hidden([name])[0, i_o : length - (far - i_o)])
        news.append(hidden([guide])[0, i_n : length - (far - i_n)])
    c_e, c_g = torch.cat(olds), torch.cat(news)
    c_p = hidden(["", *keep]).flatten(0, 1)
    lamb, a, b = 0.5, 1.0, 0.5
    kv = {n: m.weight.detach().float().clone() for n, m in xattn.kv_projections(model).items()}
    request = EraseRequest(
        targets=[Concept("circle", ["a circle"]), Concept("red square", ["a red square"])],
        preserve=[Concept("bar", keep)],
    )
    cfg = uce.UCEConfig(preset="uce-paper", guide=guides)
    assert cfg.tokens == "all" and cfg.preserve_scale == "auto" and cfg.inputs == "names" and cfg.preserve_empty
    uce.erase(model, request, cfg)
    edited = xattn.kv_projections(model)
    d = c_e.shape[1]
    m2 = lamb * torch.eye(d, dtype=torch.float64) + a * (c_e.T @ c_e).double() + b * (c_p.T @ c_p).double()
    for name, w_old in kv.items():
        m1 = lamb * w_old + a * (c_g @ w_old.T).T @ c_e + b * (c_p @ w_old.T).T @ c_p
        want = torch.linalg.solve(m2, m1.double().T).T.float()
        got = edited[name].weight.float()
        moved = (want - w_old).norm()
        assert moved > 1e-2 * w_old.norm(), name  # the edit is not a no-op
        assert (got - want).norm() < 1e-3 * moved, (name, float((got - want).norm() / moved))
    # one guide per concept: swapping them is a different edit
    for name, w in kv.items():
        edited[name].weight.data.copy_(w)
    uce.erase(model, request, uce.UCEConfig(preset="uce-paper", guide=list(reversed(guides))))
    assert any(not torch.allclose(edited[n].weight.float(), w, atol=1e-3) for n, w in kv.items())


def test_uce_templates_and_guide_count():
    """--expand_prompts: the name and five templates, the guide templated the same way; a guide list must have
    one guide per erased concept."""
    request = EraseRequest(targets=[Concept("ship", ["a ship"]), Concept("car", ["a car"])])
    pairs = uce.UCEConfig(preset="uce-object").erased_pairs(request)
    assert pairs[:2] == [("ship", ""), ("image of ship", "image of ")] and len(pairs) == 12
    art = uce.UCEConfig(preset="uce-art").erased_pairs(EraseRequest(targets=[Concept("Monet", ["x"])]))
    assert ("style of Monet", "style of art") in art
    with pytest.raises(ValueError, match="guide: 3 guides for 2"):
        uce.UCEConfig(guide=["a", "b", "c"]).check_targets([("ship", []), ("car", [])])
    with pytest.raises(ValueError, match="names the erased concept 'car'"):
        uce.UCEConfig(guide=["boat", "a red car"]).check_targets([("ship", []), ("car", [])])
