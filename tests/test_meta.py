import pytest
import torch
from pydantic import ValidationError

import methods.catalog  # noqa: F401  (registers the methods meta wraps)
from methods.datasets.base import DataContext
from methods.erasers import meta
from methods.erasers.base import Concept, EraseRequest
from tests.conftest import changed, state

TINY = dict(image_steps=2, batch_size=2, inner_steps=1, inner_lr=1e-2, lr=1e-3)


def _request(model, tmp_path):
    ctx = DataContext(resolution=model.resolution, cache_dir=tmp_path, model=model, model_key="tiny")
    return EraseRequest(
        targets=[Concept("circle", ["a circle", "a red circle"])],
        preserve=[Concept("square", ["a square"])],
        data=ctx,
    )


def test_meta_term_is_nonzero_and_on_the_trainable_parameters(tiny_sd, tmp_path):
    cfg = meta.MetaConfig(method="uce", related=meta.ImageSet(prompts=["a ring"]), **TINY)
    request = _request(tiny_sd, tmp_path)
    sets = {
        "harmful_train": meta._batches(meta._images(request, cfg.harmful, request.prompts, 0, cfg), 2),
        "harmful_test": meta._batches(meta._images(request, cfg.harmful, request.prompts, 1, cfg), 2),
        "related": meta._batches(meta._images(request, cfg.related, [], 2, cfg), 2),
        "unrelated": meta._batches(meta._images(request, cfg.unrelated, ["a square"], 3, cfg), 2),
    }
    names = sorted(n for n in tiny_sd.named_parameters() if "attn2.to_k" in n)
    for n in names:
        tiny_sd.named_parameters()[n].requires_grad_(True)
    g = meta.meta_gradient(tiny_sd, names, sets, cfg, torch.Generator().manual_seed(0))
    shapes = [tiny_sd.named_parameters()[n].shape for n in names]
    assert [x.shape for x in g] == shapes
    assert sum(float(x.norm()) for x in g) > 0
    # only the terms at theta' involve relearning: with gamma1_* = 0 the term is still non-zero
    only_meta = cfg.model_copy(update={"gamma1_1": 0.0, "gamma1_2": 0.0})
    g2 = meta.meta_gradient(tiny_sd, names, sets, only_meta, torch.Generator().manual_seed(0))
    assert sum(float(x.norm()) for x in g2) > 0


@pytest.mark.parametrize(
    "method, method_config, allowed",
    [
        ("uce", {}, ("attn2.to_k.weight", "attn2.to_v.weight")),
        ("esd", {"variant": "esd-x", "iterations": 2, "sample_steps": 3}, ("attn2",)),
    ],
)
def test_meta_changes_only_the_trainable_parameters(tiny_sd, tmp_path, method, method_config, allowed):
    unet, te = state(tiny_sd.unet), state(tiny_sd.pipe.text_encoder)
    cfg = meta.MetaConfig(method=method, method_config=method_config, outer_steps=1, **TINY)
    result = meta.erase(tiny_sd, _request(tiny_sd, tmp_path), cfg)
    moved = {f"unet.{k}" for k in changed(unet, tiny_sd.unet)}
    assert moved and moved <= set(result.trained)
    assert all(any(a in k for a in allowed) for k in result.trained)
    assert not changed(te, tiny_sd.pipe.text_encoder)
    assert not any(p.requires_grad for p in tiny_sd.unet.parameters())


def test_meta_differs_from_the_plain_method(_tiny_sd, tmp_path):
    """Same ESD steps and seed, with and without the meta term: the weights differ."""
    import copy

    from methods.erasers import esd

    a, b = copy.deepcopy(_tiny_sd), copy.deepcopy(_tiny_sd)
    esd_cfg = {"variant": "esd-x", "iterations": 2, "sample_steps": 3, "lr": 1e-3}
    esd.erase(a, _request(a, tmp_path), esd.ESDConfig(**esd_cfg))
    meta.erase(b, _request(b, tmp_path), meta.MetaConfig(method="esd", method_config=esd_cfg, outer_steps=2, **TINY))
    assert any(not torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters(), strict=True))


def test_meta_config_checks_the_wrapped_method():
    with pytest.raises(ValidationError, match="unknown method 'nope'"):
        meta.MetaConfig(method="nope")
    with pytest.raises(ValidationError, match="cannot wrap itself"):
        meta.MetaConfig(method="meta")
    with pytest.raises(ValidationError, match="method_config.eta"):
        meta.MetaConfig(method="esd", method_config={"eta": -1})
    with pytest.raises(ValidationError, match="not an imagefolder"):
        meta.ImageSet(folder="/no/such")


def test_meta_over_a_text_encoder_method(tiny_sd, tmp_path):
    """Few-shot erasure trains the text encoder: the meta gradients reach it through the relearned copy."""
    unet, te = state(tiny_sd.unet), state(tiny_sd.pipe.text_encoder)
    inner = {"epochs": 1, "images": 2, "image_steps": 2, "lr": 1e-3}
    cfg = meta.MetaConfig(method="fewshot", method_config=inner, outer_steps=1, **TINY)
    result = meta.erase(tiny_sd, _request(tiny_sd, tmp_path), cfg)
    assert result.trained and all(n.startswith("text_encoder.") for n in result.trained)
    assert changed(te, tiny_sd.pipe.text_encoder) and not changed(unet, tiny_sd.unet)


def test_meta_gradient_is_the_first_order_step_computed_by_hand(_tiny_sd):
    """g = gamma1_1 grad L(theta; unrelated) - gamma2_1 grad L(theta'; harmful test), theta' = two AdamW steps
    (clipped at norm 1) on the harmful train set from theta, over all UNet weights, computed here step by
    step; the other gammas are 0. Signs and weights must be exactly these; theta itself must not move."""
    import copy

    model = copy.deepcopy(_tiny_sd)
    g = torch.Generator().manual_seed(0)
    pixels = lambda n: torch.rand(n, 3, model.resolution, model.resolution, generator=g) * 2 - 1  # noqa: E731
    sets = {
        "harmful_train": [(pixels(2), ["a circle", "a red circle"])],
        "harmful_test": [(pixels(2), ["a circle", "a circle at night"])],
        "related": [],
        "unrelated": [(pixels(2), ["a square", "a blue square"])],
    }
    names = sorted(n for n in model.named_parameters() if n.startswith("unet.") and "attn2.to_k" in n)
    cfg = meta.MetaConfig(
        inner_steps=2, inner_lr=1e-2, weight_decay=1e-4, max_grad_norm=1.0,
        gamma1_1=0.3, gamma1_2=0.0, gamma2_1=0.7, gamma2_2=0.0, gamma2_3=0.0,
    )  # fmt: skip
    for n in names:  # as erase() does before each outer step
        model.named_parameters()[n].requires_grad_(True)
    before = state(model.unet)
    got = meta.meta_gradient(model, names, sets, cfg, torch.Generator().manual_seed(5))
    assert not changed(before, model.unet)

    # By hand, drawing the same noise in the same order (one generator, seeded alike).
    rng = torch.Generator().manual_seed(5)

    def loss_of(m, batch):
        x, captions = batch
        return m.denoising_loss(m.latents_of(x, rng), m.encode(captions), rng)

    def grads(m, batch):
        params = [m.named_parameters()[n] for n in names]
        for p in params:
            p.requires_grad_(True)
        return [gr.float() for gr in torch.autograd.grad(loss_of(m, batch), params)]

    g_unrelated = grads(model, sets["unrelated"][0])
    attacked = copy.deepcopy(model)
    weights = list(attacked.unet.parameters())
    for p in weights:
        p.requires_grad_(True)
    adam = torch.optim.AdamW(weights, lr=1e-2, weight_decay=1e-4)
    for _ in range(2):
        adam.zero_grad()
        loss_of(attacked, sets["harmful_train"][0]).backward()
        torch.nn.utils.clip_grad_norm_(weights, 1.0)
        adam.step()
    g_harmful_attacked = grads(attacked, sets["harmful_test"][0])
    for mine, a, b in zip(got, g_unrelated, g_harmful_attacked, strict=True):
        assert torch.allclose(mine, 0.3 * a - 0.7 * b, atol=1e-6, rtol=1e-4)
    assert any(not torch.allclose(a, b) for a, b in zip(g_unrelated, g_harmful_attacked, strict=True))
