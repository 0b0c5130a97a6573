import pytest
import torch

from methods.datasets.base import DataContext
from methods.erasers import mace, xattn
from methods.erasers.base import Concept, EraseRequest
from tests.conftest import changed, state


def _concepts(n):
    return [Concept(f"thing{i}", [f"a photo of thing{i}", f"thing{i} in a field"]) for i in range(n)]


def _request(model, tmp_path, n=1, **kw):
    ctx = DataContext(resolution=model.resolution, cache_dir=tmp_path, model=model, model_key="tiny")
    return EraseRequest(targets=_concepts(n), data=ctx, **kw)


def test_a_prompt_without_the_concept_is_not_mapped_silently():
    assert mace.mapped_prompt("a red circle", "circle", "ground") == "a red ground"
    with pytest.raises(ValueError, match="does not contain the concept's name 'circle'"):
        mace.mapped_prompt("a Circle", "circle", "ground")  # case matters, as in the official replace
    with pytest.raises(ValueError, match="'a ring' does not contain it"):
        mace.MACEConfig().check_targets([("circle", ["a circle", "a ring"])])


def test_matching_positions():
    # <s> a photo of [thing] </s> vs <s> a photo of [the ground] </s>: shared prefix, shared end, then pads
    o, n = mace.matching_positions([0, 1, 2, 3, 9, 5], [0, 1, 2, 3, 7, 8, 5], length=10)
    assert o == [0, 1, 2, 3, 5, 6, 7, 8] and n == [0, 1, 2, 3, 6, 7, 8, 9]


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_closed_form_refinement_is_the_least_squares_map(tiny_sd, tiny_sdxl, family):
    """Stage 1: the tokens around the concept move towards the mapping prompt's (W_orig c_mapped), and W
    is the minimiser of eq. 5's objective (its gradient vanishes), preservation cache included."""
    model = tiny_sd if family == "sd" else tiny_sdxl
    cfg = mace.MACEConfig(mapping="a dog", lamb=0.1, train_preserve_scale=1.0)
    concepts = _concepts(1)
    projections = xattn.kv_projections(model)
    before = {n: p.weight.detach().clone() for n, p in projections.items()}
    cache = mace.preservation_cache(model, ["a red square", "a cat"], projections)
    mace.closed_form_refinement(model, concepts, cfg, projections, cache)
    prompt = concepts[0].prompts[0]
    mapped = mace.mapped_prompt(prompt, concepts[0].name, cfg.mapping)
    o, n = mace.matching_positions(xattn.token_ids(model, prompt), xattn.token_ids(model, mapped), 77)
    c, c_new = xattn.embeddings(model, [prompt])[0, o], xattn.embeddings(model, [mapped])[0, n]
    cs, cns = [], []
    for p in concepts[0].prompts:
        q = mace.mapped_prompt(p, concepts[0].name, cfg.mapping)
        oo, nn = mace.matching_positions(xattn.token_ids(model, p), xattn.token_ids(model, q), 77)
        cs.append(xattn.embeddings(model, [p])[0, oo])
        cns.append(xattn.embeddings(model, [q])[0, nn])
    C, V_in = torch.cat(cs), torch.cat(cns)
    for name, proj in projections.items():
        w0, w = before[name], proj.weight.detach()
        k1, k2 = cache[name]
        grad = (C @ w.T - V_in @ w0.T).T @ C + cfg.lamb * (w - w0) + (w @ k2 - k1)
        assert grad.norm() < 1e-3 * ((C @ w0.T - V_in @ w0.T).T @ C).norm(), name
        err_before = (c @ w0.T - c_new @ w0.T).norm()
        assert (c @ w.T - c_new @ w0.T).norm() < err_before, name


def test_fusion_keeps_each_lora_output(tiny_sd):
    """Stage 3 with a negligible ridge: the fused W reproduces every concept's LoRA-edited outputs on
    that concept's prompt tokens (the LoRAs of different concepts are compatible here)."""
    cfg = mace.MACEConfig(lamb=1e-6)
    concepts = _concepts(2)
    projections = xattn.kv_projections(tiny_sd)
    g = torch.Generator().manual_seed(0)
    deltas = [
        {
            n: 0.05 * torch.randn(p.out_features, 1, generator=g) @ torch.randn(1, p.in_features, generator=g)
            for n, p in projections.items()
        }
        for _ in concepts
    ]
    w_cfr = {n: p.weight.detach().clone() for n, p in projections.items()}
    mace.fuse(tiny_sd, concepts[:1], deltas[:1], cfg, projections, {})
    c = xattn.embeddings(tiny_sd, concepts[0].prompts).flatten(0, 1)
    for name, proj in projections.items():
        want = c @ (w_cfr[name] + deltas[0][name]).T
        assert (c @ proj.weight.T - want).norm() < 1e-2 * want.norm(), name


def test_lora_stage_lowers_attention_to_the_concept(tiny_sd, tmp_path):
    cfg = mace.MACEConfig(steps=25, images=1, image_steps=2, lr=5e-2, lamb=1.0)
    request = _request(tiny_sd, tmp_path)
    projections = xattn.kv_projections(tiny_sd)
    losses: list[float] = []
    before = {n: p.weight.detach().clone() for n, p in projections.items()}
    deltas = mace.train_lora(tiny_sd, request, request.targets[0], 0, cfg, projections, losses)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    assert any(d.norm() > 0 for d in deltas.values()) and all(d.shape == before[n].shape for n, d in deltas.items())
    assert all(torch.equal(p.weight, before[n]) for n, p in projections.items())  # hooks only; removed after
    assert not any(h for p in projections.values() for h in p._forward_hooks.values())


@pytest.mark.parametrize("n", [1, 5, 10, 100])
def test_mace_erases_many_concepts_at_once(tiny_sd, tmp_path, n):
    from PIL import Image

    for i in range(n):  # one image per concept from a folder (drawing 100 concepts' images is the slow part)
        (tmp_path / "img" / f"thing{i}").mkdir(parents=True)
        Image.new("RGB", (16, 16), (i, 100, 200)).save(tmp_path / "img" / f"thing{i}" / "0.png")
    unet, te = state(tiny_sd.unet), state(tiny_sd.pipe.text_encoder)
    request = _request(tiny_sd, tmp_path, n, preserve=[Concept("square", ["a square"])])
    cfg = mace.MACEConfig(mapping="a dog", steps=1, lr=1e-3, image_folder=str(tmp_path / "img"))
    result = mace.erase(tiny_sd, request, cfg)
    moved = {f"unet.{k}" for k in changed(unet, tiny_sd.unet)}
    assert moved == set(result.trained) and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in moved)
    assert not changed(te, tiny_sd.pipe.text_encoder)
    assert len(result.losses) == n  # one LoRA step per concept
    assert all(torch.isfinite(p).all() for p in tiny_sd.unet.parameters())


def test_mace_runs_on_sdxl_with_masks(tiny_sdxl, tmp_path):
    from PIL import Image

    images, masks = tmp_path / "img" / "thing0", tmp_path / "mask" / "thing0"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    Image.new("RGB", (32, 32), "red").save(images / "a.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 16))
    mask.save(masks / "a.png")
    folders = dict(image_folder=str(tmp_path / "img"), mask_folder=str(tmp_path / "mask"))
    cfg = mace.MACEConfig(mapping="a dog", steps=2, **folders)
    m = mace._masks(cfg, "thing0", ["a"], 8)
    assert m.sum() == 16 and m[0, 0, 0, 0] == 1 and m[0, 0, 7, 7] == 0
    before = state(tiny_sdxl.unet)
    mace.erase(tiny_sdxl, EraseRequest(targets=_concepts(1)), cfg)
    assert changed(before, tiny_sdxl.unet)
    with pytest.raises(ValueError, match="no such folder"):
        mace.MACEConfig(image_folder=str(tmp_path / "nope"))


def test_fusion_of_several_concepts_is_eq8_computed_here(tiny_sd):
    """Stage 3 (eq. 8) for three concepts with a preservation cache, solved in the test from the text
    encoder's own outputs (every token of every prompt, padding included, as the official code):
    W = (lamb W_cfr + sum_i (W_i C_i^T) C_i + s K1)(lamb I + sum_i C_i^T C_i + s K2)^-1,
    W_i = W_cfr + delta_i, K1 = sum_p (W_cfr c_p) c_p^T, K2 = sum_p c_p c_p^T over the preserved prompts."""
    concepts = _concepts(3)
    keep = ["a red square", "a cat on a mat"]
    lamb, s = 0.5, 0.01
    cfg = mace.MACEConfig(lamb=lamb, fuse_preserve_scale=s)
    tok, encoder = tiny_sd.pipe.tokenizer, tiny_sd.pipe.text_encoder

    @torch.no_grad()
    def tokens(prompts):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        return encoder(ids)[0].float().flatten(0, 1)  # (N * 77, D)

    projections = xattn.kv_projections(tiny_sd)
    g = torch.Generator().manual_seed(1)
    deltas = [
        {n: 0.05 * torch.randn(p.out_features, 1, generator=g) @ torch.randn(1, p.in_features, generator=g)
         for n, p in projections.items()}
        for _ in concepts
    ]  # fmt: skip
    w_cfr = {n: p.weight.detach().float().clone() for n, p in projections.items()}
    cache = mace.preservation_cache(tiny_sd, keep, projections)
    mace.fuse(tiny_sd, concepts, deltas, cfg, projections, cache)
    contexts, c_p = [tokens(c.prompts).double() for c in concepts], tokens(keep).double()
    d = c_p.shape[1]
    for name, proj in projections.items():
        w0 = w_cfr[name].double()
        m1 = lamb * w0 + s * (c_p @ w0.T).T @ c_p
        m2 = lamb * torch.eye(d, dtype=torch.float64) + s * c_p.T @ c_p
        for c, delta in zip(contexts, deltas, strict=True):
            m1 += (c @ (w0 + delta[name].double()).T).T @ c
            m2 += c.T @ c
        want = torch.linalg.solve(m2, m1.T).T  # in float64; the method solves in float32
        err = (proj.weight.double() - want).norm() / want.norm()
        assert err < 1e-3, (name, float(err))  # the method sums in float32
    # each concept's own LoRA output is approximately kept on its tokens, better than by the unfused weights
    name = next(iter(projections))
    w_fused, w_unfused = projections[name].weight.double(), w_cfr[name].double()
    for c, delta in zip(contexts, deltas, strict=True):
        target = c @ (w_unfused + delta[name].double()).T
        assert (c @ w_fused.T - target).norm() < (c @ w_unfused.T - target).norm()
