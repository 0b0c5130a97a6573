import pytest
import torch

from methods.datasets.base import DataContext
from methods.erasers import fewshot
from methods.erasers.base import Concept, EraseRequest
from tests.conftest import changed, state


def _request(model, tmp_path, seed=0):
    ctx = DataContext(resolution=model.resolution, cache_dir=tmp_path, model=model, model_key="tiny")
    return EraseRequest(targets=[Concept("circle", ["a circle", "a red circle"])], data=ctx, seed=seed)


def _concept_loss(model, request, cfg):
    """The denoising loss on the concept's images and prompts, on fixed noise and timesteps."""
    obj = fewshot.FewShotObjective(model, request, cfg)
    try:
        with torch.no_grad():
            cond = model.encode(["a circle"] * len(obj.latents))
            return float(model.denoising_loss(obj.latents, cond, torch.Generator().manual_seed(5)))
    finally:
        obj.close()


def test_fewshot_raises_the_concept_denoising_loss(tiny_sd, tmp_path):
    cfg = fewshot.FewShotConfig(lr=3e-2, epochs=10, images=4, image_steps=2, templates="concept")
    request = _request(tiny_sd, tmp_path)
    before = _concept_loss(tiny_sd, request, cfg)
    unet = state(tiny_sd.unet)
    result = fewshot.erase(tiny_sd, request, cfg)
    assert _concept_loss(tiny_sd, request, cfg) > before
    assert len(result.losses) == 10 * 2  # 10 epochs of 4 images in batches of 2
    assert not changed(unet, tiny_sd.unet)  # only the text encoder moves


@pytest.mark.parametrize(
    "subset, must, must_not",
    [
        ("mlp-final-attn", ["mlp.fc1", "layers.1.self_attn"], ["layers.0.self_attn", "embeddings", "norm"]),
        ("mlp-only", ["mlp.fc2"], ["self_attn", "embeddings"]),
        ("attn-only", ["layers.0.self_attn"], ["mlp", "embeddings"]),
        ("mlp-attn", ["mlp.fc1", "layers.0.self_attn"], ["embeddings", "norm"]),
        ("all", ["embeddings", "mlp.fc1"], []),
    ],
)
def test_fewshot_trains_only_its_subset(tiny_sd, tmp_path, subset, must, must_not):
    te = state(tiny_sd.pipe.text_encoder)
    cfg = fewshot.FewShotConfig(subset=subset, lr=1e-3, epochs=1, images=2, image_steps=2)
    result = fewshot.erase(tiny_sd, _request(tiny_sd, tmp_path), cfg)
    moved = {f"text_encoder.{k}" for k in changed(te, tiny_sd.pipe.text_encoder)}
    assert moved and moved <= set(result.trained)
    assert all(any(m in k for k in result.trained) for m in must)
    assert not any(m in k for k in result.trained for m in must_not)


def test_fewshot_sdxl_trains_both_encoders_and_zero_shot_needs_no_images(tiny_sdxl):
    one, two = state(tiny_sdxl.pipe.text_encoder), state(tiny_sdxl.pipe.text_encoder_2)
    request = EraseRequest(targets=[Concept("circle", ["a circle"])])  # no data context: zero-shot only
    fewshot.erase(tiny_sdxl, request, fewshot.FewShotConfig(zero_shot=True, lr=1e-3, epochs=2))
    assert changed(one, tiny_sdxl.pipe.text_encoder) and changed(two, tiny_sdxl.pipe.text_encoder_2)
    with pytest.raises(ValueError, match="data context"):
        fewshot.erase(tiny_sdxl, request, fewshot.FewShotConfig())


def test_fewshot_is_seeded(_tiny_sd, tmp_path):
    import copy

    a, b = copy.deepcopy(_tiny_sd), copy.deepcopy(_tiny_sd)
    cfg = fewshot.FewShotConfig(lr=1e-3, epochs=1, images=2, image_steps=2)
    fewshot.erase(a, _request(a, tmp_path, seed=3), cfg)
    fewshot.erase(b, _request(a, tmp_path, seed=3), cfg)
    pa, pb = a.pipe.text_encoder.parameters(), b.pipe.text_encoder.parameters()
    assert all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
