import json

import pytest
import torch

from methods.models import MODELS, PretrainedConfig, load_model, pretrained_family
from methods.tokenizer import clip_tokenizer
from tests.conftest import request


def test_tokenizer_gives_stable_diffusion_ids():
    tok = clip_tokenizer()
    # SD v1.x's CLIP tokenizer: "a photo of a" -> 320 1125 539 320, bos 49406, eos = pad 49407
    ids = tok("a photo of a cat").input_ids
    assert ids[:5] == [49406, 320, 1125, 539, 320] and ids[-1] == 49407
    assert len(tok) == 49408 and tok.pad_token_id == 49407
    assert clip_tokenizer(pad_token="!").pad_token_id == 0  # SDXL's second tokenizer pads with "!"


def test_tiny_sd_structure(tiny_sd):
    assert tiny_sd.family == "sd"
    xattn = [m for n, m in tiny_sd.unet.named_modules() if n.endswith("attn2")]
    assert xattn and all(m.to_k.in_features == 32 for m in xattn)  # text width -> K/V
    cond = tiny_sd.encode(["a red circle", "a blue square"])
    assert cond.prompt_embeds.shape == (2, 77, 32)
    images = tiny_sd.generate(["a red circle"], [0], steps=2, guidance_scale=7.5)
    assert images.shape == (1, 3, tiny_sd.resolution, tiny_sd.resolution)
    assert 0 <= images.min() and images.max() <= 1


def test_tiny_sdxl_structure(tiny_sdxl):
    assert tiny_sdxl.family == "sdxl" and len(tiny_sdxl.text_encoders) == 2
    cond = tiny_sdxl.encode(["a red circle"])
    assert cond.prompt_embeds.shape == (1, 77, 64)  # two encoders concatenated (32 + 32)
    assert cond.added_cond_kwargs["text_embeds"].shape == (1, 32)
    assert cond.added_cond_kwargs["time_ids"].shape == (1, 6)
    assert tiny_sdxl.vae.dtype == torch.float32


def test_generation_is_deterministic_per_seed(tiny_sd):
    a = tiny_sd.generate(["a circle", "a square"], [3, 4], steps=3, guidance_scale=5.0)
    b = tiny_sd.generate(["a square"], [4], steps=3, guidance_scale=5.0)
    assert torch.allclose(a[1], b[0], atol=1e-5)  # an image does not depend on its batch
    assert not torch.allclose(a[0], a[1])


@pytest.mark.parametrize("name", ["tiny-sd", "tiny-sdxl"])
def test_pretrained_round_trip(tmp_path, name, request):
    model = request.getfixturevalue(name.replace("-", "_"))
    model.pipe.save_pretrained(tmp_path / "m", safe_serialization=True)
    loaded = load_model("pretrained", {"path": str(tmp_path / "m")}, device="cpu")
    assert loaded.family == model.family
    for key, module in model.modules().items():
        theirs = loaded.modules()[key].state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in module.state_dict().items()), key
    a = model.generate(["a circle"], [0], steps=2, guidance_scale=3.0)
    b = loaded.generate(["a circle"], [0], steps=2, guidance_scale=3.0)
    assert torch.allclose(a, b, atol=1e-5)


def test_pretrained_refuses_pickle_weights(tmp_path, tiny_sd):
    tiny_sd.pipe.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(FileNotFoundError, match="no .safetensors weights"):
        load_model("pretrained", {"path": str(tmp_path / "bin")}, device="cpu")


def test_pretrained_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        pretrained_family(PretrainedConfig(path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="allow_download"):
        pretrained_family(PretrainedConfig(path="nobody/no-such-model-here"))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ValueError, match="FluxPipeline"):
        pretrained_family(PretrainedConfig(path=str(tmp_path)))


def test_registry_lists_known_names():
    with pytest.raises(KeyError, match="known: pretrained, tiny-sd, tiny-sdxl"):
        MODELS.get("sd-99")


def test_half_precision_trains_fp32_master_weights():
    """A model loaded in bf16 trains its chosen weights in fp32 under autocast (no pure-half Adam) and
    still generates; untouched weights stay in bf16."""
    from methods.datasets.base import CaptionedImages
    from methods.erasers import esd
    from methods.finetune import FinetuneConfig, finetune

    model = load_model("tiny-sdxl", {"seed": 0}, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.vae.dtype == torch.float32  # SDXL's VAE stays fp32
    result = esd.erase(model, request("a circle"), esd.ESDConfig(iterations=2, sample_steps=3))
    named = model.named_parameters()
    assert all(named[n].dtype == torch.float32 for n in result.trained)
    assert any(p.dtype == torch.bfloat16 for n, p in named.items() if n not in result.trained)
    data = CaptionedImages(torch.zeros(2, 3, model.resolution, model.resolution), ["a", "b"])
    ft = finetune(model, data, FinetuneConfig(trainable="xattn", steps=2))
    assert all(torch.isfinite(torch.tensor(ft.losses)))
    images = model.generate(["a circle"], [0], steps=2, guidance_scale=3.0)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
