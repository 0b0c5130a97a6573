import pytest
import torch

from methods.datasets.base import CaptionedImages
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


def test_a_second_lora_round_trains_the_same_adapter_only(tiny_sd):
    cfg = FinetuneConfig(trainable="lora", lora_rank=2, steps=2, lr=1e-2)
    first = finetune(tiny_sd, _data(tiny_sd), cfg)
    base = {k: v for k, v in state(tiny_sd.unet).items() if "lora_" not in k}
    second = finetune(tiny_sd, _data(tiny_sd), cfg.model_copy(update={"seed": 1}))  # a later round
    assert second.trained == first.trained and all("lora_" in n for n in second.trained)
    after = tiny_sd.unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())  # no base weight moved in round 2


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


@pytest.mark.parametrize("trainable", ["full", "lora"])
def test_a_fine_tune_stopped_and_continued_elsewhere_ends_where_an_unbroken_one_does(tmp_path, tiny_sd, trainable):
    """save() at step 3, load() into a fresh copy of the model (another process after a crash), run on to
    step 6: the same losses and the same weights as six steps in one go (data order, noise, optimizer)."""
    import copy

    from methods.finetune import Finetuner

    cfg = FinetuneConfig(trainable=trainable, steps=6, lr=1e-3, batch_size=3, seed=4)
    fresh = copy.deepcopy(tiny_sd)
    data = _data(tiny_sd, n=5)  # batches wrap around the shuffled epoch: the cursor and order are state too
    torch.manual_seed(123)  # LoRA's initial draw (the global generator): the same for the unbroken run
    whole = Finetuner(tiny_sd, data, cfg).run()

    torch.manual_seed(123)  # ... and for the run that stops at step 3
    first = Finetuner(copy.deepcopy(fresh), data, cfg)
    seen: list[int] = []

    def stop_at_3(step, loss):
        seen.append(step)
        if step == 3:
            first.save(tmp_path / "ckpt")
            raise KeyboardInterrupt  # the worker dies here

    with pytest.raises(KeyboardInterrupt):
        first.run(every=3, callback=stop_at_3)
    resumed_model = copy.deepcopy(fresh)
    torch.manual_seed(999)  # another LoRA draw: the checkpoint's values must replace it
    second = Finetuner(resumed_model, data, cfg)
    second.load(tmp_path / "ckpt")
    rest = second.run()
    assert rest.losses == pytest.approx(whole.losses, rel=1e-6, abs=1e-7) and len(rest.losses) == 6
    for (name, a), (_, b) in zip(
        tiny_sd.effective_weights().items(), resumed_model.effective_weights().items(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name


def test_a_diverging_fine_tune_stops_with_diverged(tiny_sd):
    """A loss that is no longer finite ends the fine-tune with Diverged (the step and the loss), not with
    nan weights trained on."""
    from methods.finetune import Diverged

    cfg = FinetuneConfig(trainable="full", optimizer="sgd", lr=1.0, steps=50, max_grad_norm=None)
    with pytest.raises(Diverged) as caught:
        finetune(tiny_sd, _data(tiny_sd), cfg)
    assert 1 <= caught.value.step <= 50 and not torch.isfinite(torch.tensor(caught.value.loss))
