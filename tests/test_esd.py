import pytest
import torch

from methods.erasers import esd
from tests.conftest import changed, request, state

FAST = dict(iterations=3, sample_steps=4, lr=1e-3)


@pytest.mark.parametrize("variant", ["esd-x", "esd-u", "esd-x-strict"])
def test_esd_changes_only_its_variants_parameters(tiny_sd, variant):
    before_unet, before_te = state(tiny_sd.unet), state(tiny_sd.pipe.text_encoder)
    result = esd.erase(tiny_sd, request("a circle"), esd.ESDConfig(variant=variant, **FAST))
    moved = changed(before_unet, tiny_sd.unet)
    assert moved, "ESD changed nothing"
    assert {f"unet.{k}" for k in moved} == set(result.trained)
    if variant == "esd-x":
        assert all("attn2" in k for k in moved)
    elif variant == "esd-u":
        assert not any("attn2" in k for k in moved)
        assert not any("norm" in k for k in moved)  # Linear/Conv2d only, as the official code
    else:
        assert all("attn2.to_k" in k or "attn2.to_v" in k for k in moved)
    assert not changed(before_te, tiny_sd.pipe.text_encoder)  # the text encoder stays
    assert not any(p.requires_grad for p in tiny_sd.unet.parameters())


def test_esd_moves_concept_prediction_towards_negative_guidance_target(tiny_sd):
    """The loss ESD minimises (eq. 3) goes down over iterations on a fixed x_t."""
    cfg = esd.ESDConfig(variant="esd-x", iterations=30, sample_steps=4, lr=1e-3)
    result = esd.erase(tiny_sd, request("a circle", seed=1), cfg)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first


def test_esd_is_seeded(_tiny_sd):
    import copy

    a, b = copy.deepcopy(_tiny_sd), copy.deepcopy(_tiny_sd)
    esd.erase(a, request("a circle", seed=7), esd.ESDConfig(**FAST))
    esd.erase(b, request("a circle", seed=7), esd.ESDConfig(**FAST))
    assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters(), strict=True))


def test_esd_runs_on_sdxl(tiny_sdxl):
    before = state(tiny_sdxl.unet)
    esd.erase(tiny_sdxl, request("a circle"), esd.ESDConfig(**FAST))
    moved = changed(before, tiny_sdxl.unet)
    assert moved and all("attn2" in k for k in moved)


def test_esd_config_rejects_bad_values():
    with pytest.raises(ValueError, match="eta"):
        esd.ESDConfig(eta=-1)
    with pytest.raises(ValueError, match="variant"):
        esd.ESDConfig(variant="esd-z")
