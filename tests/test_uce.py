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
    c_e, c_g = uce._pairs(model, request.prompts, cfg.guide, tokens)
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
