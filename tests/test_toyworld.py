import numpy as np
import pytest
import torch
from pydantic import ValidationError

from methods import toyworld as tw
from methods.datasets.base import DATASETS, DataContext
from methods.detectors.base import load_detector
from methods.models import DiffusionModel, load_model
from tests.conftest import request


def test_samples_are_deterministic_and_labelled():
    a, b = tw.samples(40, seed=3), tw.samples(40, seed=3)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b, strict=True))
    c = tw.samples(40, seed=4)
    assert any(not np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, c, strict=True))
    for s in a:
        assert s.image.size == (16, 16)
        assert s.colour in s.caption and s.shape in s.caption
    # the centre pixel carries the colour of the label
    r, g, b = np.asarray(tw.draw("square", "blue", 16)).astype(int)[8, 8]
    assert b > 200 and r < 100 and g < 120


def test_exclusion_and_synonyms():
    drawn = tw.samples(200, seed=0, exclude=("circle", "red"), synonyms=True)
    assert all(s.shape != "circle" and s.colour != "red" for s in drawn)
    assert not any("circle" in s.caption or "disk" in s.caption or "red" in s.caption for s in drawn)
    assert any(tw.SYNONYMS[s.shape] in s.caption for s in drawn)
    assert {s.shape for s in drawn} == set(tw.SHAPES) - {"circle"}
    with pytest.raises(ValueError, match="every"):
        tw.samples(1, shapes=("circle",), exclude=("circle",))


def test_concept_prompts():
    assert tw.concept_prompts("circle")[0] == "a red circle" and len(tw.concept_prompts("circle")) == 6
    assert tw.concept_prompts("circle", synonyms=True)[0] == "a red disk"
    assert tw.concept_prompts("blue") == [f"a blue {s}" for s in tw.SHAPES]
    with pytest.raises(ValueError, match="unknown toy concept"):
        tw.concept_prompts("dog")


def test_committed_detector_is_accurate():
    """The committed weights: >= 98% on clean held-out images (measured: 100%), robust to noise."""
    report = tw.evaluate_detector(tw.load_detector_net())
    assert report.shape_accuracy >= 0.98 and report.colour_accuracy >= 0.98
    assert report.noisy_shape_accuracy >= 0.95


def test_detector_training_reproduces_in_a_short_run():
    net = tw.train_detector(seed=0, steps=200)
    report = tw.evaluate_detector(net)
    assert report.shape_accuracy >= 0.95 and report.colour_accuracy >= 0.95


def test_toy_detector_classify():
    det = load_detector("toy", {}, torch.device("cpu"))
    images = tw.to_tensor([tw.draw("triangle", "green"), tw.draw("bar", "red")])
    assert det.classify(images, ["circle", "triangle", "bar"]).tolist() == [1, 2]
    assert det.classify(images, ["circle", "square"]).tolist() == [-1, -1]  # neither shape is asked about
    assert det.classify(images, ["red", "green"]).tolist() == [1, 0]  # colours when no shape matches
    blank = torch.zeros(1, 3, 16, 16)
    strict = load_detector("toy", {"min_confidence": 0.999}, torch.device("cpu"))
    assert strict.classify(blank, list(tw.SHAPES)).tolist() == [-1]
    with pytest.raises(ValidationError, match="no such file"):
        tw.ToyDetectorConfig(weights="/no/such.safetensors")


def test_toy_dataset_entry(tmp_path):
    entry = DATASETS.get("toy")
    data = entry.obj(entry.config(n=50, exclude=["circle"]), DataContext(resolution=16, cache_dir=tmp_path))
    assert len(data) == 50 and data.pixels.shape == (50, 3, 16, 16)
    assert -1.0 <= float(data.pixels.min()) and float(data.pixels.max()) <= 1.0
    assert not any("circle" in c for c in data.captions)
    with pytest.raises(ValidationError, match="unknown toy concept"):
        entry.config(exclude=["dog"])
    with pytest.raises(ValidationError, match="shapes: unknown toy concept"):
        entry.config(shapes=["red"])
    with pytest.raises(ValidationError, match="leaves no"):
        entry.config(shapes=["circle"], exclude=["circle"])


@pytest.fixture(scope="module")
def toy_small():
    shape = tw.ToyModelShape(channels=(32, 64))
    return DiffusionModel(tw.build_toy_pipeline(shape, seed=0), "toy-small")


def test_pixel_space_model(toy_small, tmp_path):
    m = toy_small
    assert m.pixel_space and m.fold == 2 and m.resolution == 16
    pixels = tw.to_tensor([tw.draw("circle", "red")]) * 2 - 1
    latents = m.latents_of(pixels)
    assert latents.shape == (1, 12, 8, 8)  # space-to-depth: an exact stand-in for a VAE
    assert torch.allclose(m.pixels_of(latents), (pixels + 1) / 2, atol=1e-6)
    images = m.generate(["a red circle", "a blue bar"], [0, 1], steps=3, guidance_scale=3.0)
    assert images.shape == (2, 3, 16, 16)
    # save as a diffusers folder (no VAE) and load it back through the `pretrained` entry
    m.pipe.save_pretrained(tmp_path / "toy", safe_serialization=True)
    loaded = load_model("pretrained", {"path": str(tmp_path / "toy")}, device="cpu")
    assert loaded.pixel_space and loaded.resolution == 16
    again = loaded.generate(["a red circle", "a blue bar"], [0, 1], steps=3, guidance_scale=3.0)
    assert torch.allclose(images, again, atol=1e-5)


def test_erasure_and_finetuning_run_in_pixel_space(toy_small, tmp_path):
    import copy

    from methods.erasers import esd
    from methods.finetune import FinetuneConfig, finetune
    from tests.conftest import changed, state

    m = copy.deepcopy(toy_small)
    before = state(m.unet)
    esd.erase(m, request("a red circle"), esd.ESDConfig(iterations=2, sample_steps=3))
    assert all("attn2" in k for k in changed(before, m.unet))
    data = DATASETS.get("toy").obj(tw.ToyDataConfig(n=8), DataContext(resolution=16, cache_dir=tmp_path))
    result = finetune(m, data, FinetuneConfig(steps=2, trainable="lora"))
    assert len(result.losses) == 2


@pytest.fixture(scope="module")
def toy_model():
    return load_model("toy")


def test_committed_toy_model_draws_every_shape(toy_model):
    """Base presence of each shape on its own prompts, 24 images per shape (issue target >= 0.8;
    measured 0.875 for triangle, 1.0 for the others)."""
    from methods.erasers.base import Concept
    from methods.evaluation.presence import EvalConfig, evaluate

    det = load_detector("toy", {}, toy_model.device)
    concepts = [Concept(s, tw.concept_prompts(s)) for s in tw.SHAPES]
    ev = evaluate(toy_model, det, concepts, EvalConfig(images_per_prompt=4, steps=20, guidance_scale=3.0))
    assert all(v >= 0.8 for v in ev.presence.values()), ev.presence
    assert toy_model.pixel_space and toy_model.resolution == 16


def test_esd_erases_a_shape_from_the_committed_model(toy_model):
    """ESD-x on "cross" (the main job's erasure): the cross mostly disappears, the other shapes mostly
    stay (full script, 24 images per shape: cross 1.0 -> 0.083, others fall 0 to 0.21)."""
    import copy

    from methods.erasers import esd
    from methods.erasers.base import Concept
    from methods.evaluation.presence import EvalConfig, evaluate

    det = load_detector("toy", {}, toy_model.device)
    concepts = [Concept(s, tw.concept_prompts(s)) for s in tw.SHAPES]
    cfg = EvalConfig(images_per_prompt=2, steps=20, guidance_scale=3.0)
    base = evaluate(toy_model, det, concepts, cfg)
    erased = copy.deepcopy(toy_model)
    esd.erase(
        erased,
        request(*tw.concept_prompts("cross"), name="cross"),
        esd.ESDConfig(variant="esd-x", iterations=200, lr=5e-4, sample_steps=20),
    )
    after = evaluate(erased, det, concepts, cfg)
    assert base.presence["cross"] >= 0.8 and after.presence["cross"] <= 0.2, after.presence
    drops = [base.presence[s] - after.presence[s] for s in tw.SHAPES if s != "cross"]
    assert sum(drops) / len(drops) <= 0.15, after.presence


def test_toy_model_command_shortened_run(tmp_path, capsys):
    """`resurgence toy train-model` from scratch, shortened to 200 of its 3,500 steps: the loss falls (a
    300-step run here: 0.70 at step 100, 0.27 at step 200) and the saved folder loads as model `toy`.
    Following prompts takes ~2,500 steps; the full command's quality is the slow test below."""
    import re

    from orchestrator.cli import main

    out = tmp_path / "toy"
    assert main(["toy", "train-model", "--steps", "200", "--check-every", "100", "--out", str(out)]) == 0
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", capsys.readouterr().out)]
    assert len(losses) == 2 and losses[1] < 0.5 * losses[0] and losses[1] < 0.4, losses
    model = load_model("toy", {"path": str(out)})
    images = model.generate(["a red circle"], [0], steps=5, guidance_scale=3.0)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


@pytest.mark.slow
def test_toy_model_command_reproduces_committed_quality(tmp_path):
    """The exact command that produced the committed weights, from scratch (about 25 minutes): every shape
    is drawn on its own prompts at least 80% of the time, as the committed model does."""
    from orchestrator.cli import main

    out = tmp_path / "toy"
    assert main(["toy", "train-model", "--out", str(out)]) == 0
    report = tw.generation_accuracy(load_model("toy", {"path": str(out)}), tw.load_detector_net(), per_pair=4)
    assert min(report.per_shape.values()) >= 0.8, report.per_shape
