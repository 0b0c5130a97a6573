import pytest
import torch

from methods.datasets import CaptionedImages
from methods.finetune import FinetuneConfig, finetune
from tests.conftest import changed, state


def _data(model, n=4):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand((n, 3, model.resolution, model.resolution), generator=g) * 2 - 1
    return CaptionedImages(pixels, [f"a picture number {i}" for i in range(n)])


def test_lora_leaves_base_weights_untouched(tiny_sd):
    before = state(tiny_sd.unet)
    image_before = tiny_sd.generate(["a circle"], [0], steps=2, guidance_scale=3.0)
    result = finetune(tiny_sd, _data(tiny_sd), FinetuneConfig(trainable="lora", lora_rank=2, steps=3, lr=1e-2))
    assert result.trained and all("lora_" in n for n in result.trained)
    after = tiny_sd.unet.state_dict()
    # every original tensor is still there and equal (peft renames wrapped weights to *.base_layer.*)
    for key, value in before.items():
        new_key = (
            key if key in after else key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        )
        assert torch.equal(value, after[new_key]), key
    lora = [v for k, v in after.items() if "lora_B" in k]
    assert lora and any(v.abs().sum() > 0 for v in lora)  # the adapters did train
    image_after = tiny_sd.generate(["a circle"], [0], steps=2, guidance_scale=3.0)
    assert not torch.allclose(image_before, image_after)


@pytest.mark.parametrize(("trainable", "part"), [("xattn", "unet"), ("full", "unet"), ("text_encoder", "text")])
def test_trainable_subsets(tiny_sd, trainable, part):
    unet_before, te_before = state(tiny_sd.unet), state(tiny_sd.pipe.text_encoder)
    vae_before = state(tiny_sd.vae)
    finetune(tiny_sd, _data(tiny_sd), FinetuneConfig(trainable=trainable, steps=2, lr=1e-2, max_grad_norm=None))
    unet_moved, te_moved = changed(unet_before, tiny_sd.unet), changed(te_before, tiny_sd.pipe.text_encoder)
    if part == "unet":
        assert unet_moved and not te_moved
        if trainable == "xattn":
            assert all("attn2" in k for k in unet_moved)
    else:
        assert te_moved and not unet_moved
    assert changed(vae_before, tiny_sd.vae) == set()


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_optimizers_and_callback_steps(tiny_sd, optimizer):
    seen = []
    result = finetune(
        tiny_sd,
        _data(tiny_sd, 3),
        FinetuneConfig(optimizer=optimizer, steps=7, batch_size=2),
        every=3,
        callback=lambda step, loss: seen.append(step),
    )
    assert seen == [3, 6, 7]  # every 3 steps, and the last one
    assert len(result.losses) == 7 and all(torch.isfinite(torch.tensor(result.losses)))


def test_finetune_is_seeded(_tiny_sd):
    import copy

    losses = []
    for _ in range(2):
        m = copy.deepcopy(_tiny_sd)
        losses.append(finetune(m, _data(m), FinetuneConfig(steps=3, seed=5)).losses)
    assert losses[0] == losses[1]


def test_finetune_sdxl_text_encoders(tiny_sdxl):
    before = state(tiny_sdxl.pipe.text_encoder_2)
    finetune(tiny_sdxl, _data(tiny_sdxl), FinetuneConfig(trainable="text_encoder", steps=2, lr=1e-2))
    assert changed(before, tiny_sdxl.pipe.text_encoder_2)
