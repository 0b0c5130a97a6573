import pytest
import torch

from methods.erasers import esd
from tests.conftest import changed, request, state

FAST = dict(iterations=3, sample_steps=4, lr=1e-3)


@pytest.mark.parametrize("variant", ["esd-x", "esd-u", "esd-x-strict", "noxattn", "full"])
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
    elif variant == "esd-x-strict":
        assert all("attn2.to_k" in k or "attn2.to_v" in k for k in moved)
    else:  # every parameter, norms included (full); but cross-attention, time embedding and output (noxattn)
        every = {n for n, _ in tiny_sd.unet.named_parameters()}
        skipped = {n for n in every if "attn2" in n or "time_embedding" in n or n.startswith(("conv_out", "conv_norm"))}
        assert set(result.trained) == {f"unet.{n}" for n in (every if variant == "full" else every - skipped)}
        assert any("norm" in k for k in result.trained) and skipped
        assert ("unet.conv_out.weight" in result.trained) == (variant == "full")
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


# eta 0: the official SDXL recipe (target eps*(x_t, t)); student: the paper-era script's and meta's x_t
@pytest.mark.parametrize(("eta", "xt_from"), [(0.0, "frozen"), (1.0, "frozen"), (2.5, "frozen"), (3.0, "student")])
def test_esd_loss_is_eq3_with_x_t_from_the_frozen_model(_tiny_sd, eta, xt_from):
    """Eq. 3 computed here: target = eps*(x_t, t) - eta [eps*(x_t, c, t) - eps*(x_t, t)] with eps* the original
    UNet, x_t drawn by the original UNet (not the one being trained; the trained one with xt_from student),
    loss = mean (eps_theta(x_t, c, t) - target)^2."""
    import copy

    model = copy.deepcopy(_tiny_sd)
    original = copy.deepcopy(model.unet).eval()
    cfg = esd.ESDConfig(variant="esd-x", sample_steps=6, eta=eta, start_guidance=3.0, xt_from=xt_from)
    objective = esd.ESDObjective(model, request("a circle", seed=3), cfg)
    with torch.no_grad():  # as if training had moved the trained weights: eps_theta != eps*
        g = torch.Generator().manual_seed(0)
        for p in objective.params.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    seen = []
    eps = model.eps
    model.eps = lambda x, t, cond, unet=None: seen.append((x.clone(), t.clone())) or eps(x, t, cond, unet)
    replay = torch.Generator().set_state(objective.generator.get_state())
    got = float(objective.loss(0))
    model.eps = eps

    stop_at = int(torch.randint(0, cfg.sample_steps - 1, (1,), generator=replay))
    seeds = torch.randint(0, 2**31 - 1, (1,), generator=replay).tolist()
    with torch.no_grad():
        cond, null = model.encode(["a circle"]), model.unconditional(1)
        x_t, t = model.sample(
            cond, null, model.noise(seeds), steps=6, stop_at=stop_at, guidance_scale=3.0, unet=original
        )
        trained_x_t, _ = model.sample(cond, null, model.noise(seeds), steps=6, stop_at=stop_at, guidance_scale=3.0)
        assert not torch.allclose(trained_x_t, x_t)  # the trained model draws another x_t
        if xt_from == "student":
            x_t = trained_x_t
        # the loss's three predictions (after the sampling's own) are all at that x_t
        assert len(seen) > 3 and all(torch.equal(x, x_t) and torch.equal(tt, t) for x, tt in seen[-3:])
        assert stop_at > 0  # (seed 3 draws a partial sampling: x_t is not the bare noise)

        def unet(net, c):
            return net(x_t, t, encoder_hidden_states=c.prompt_embeds).sample.float()

        e_0, e_p, e_n = unet(original, null), unet(original, cond), unet(model.unet, cond)
        target = e_0 - eta * (e_p - e_0)
        want = float(((e_n - target) ** 2).mean())
    assert got == pytest.approx(want, rel=1e-5)
    objective.close()
