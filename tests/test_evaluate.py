import torch

from methods.catalog import DETECTORS  # noqa: F401 (registers every detector)
from methods.detectors.base import Detection, load_detector
from methods.evaluation.pictures import save_grid
from methods.evaluation.presence import EvalConcept, EvalConfig, Prompt, closeness, evaluate, mean_embedding

CONCEPTS = [EvalConcept("circle", [Prompt("a circle"), Prompt("a ring")]), EvalConcept("square", [Prompt("a square")])]


class Fixed:
    """A detector that always answers one class: presence must follow exactly."""

    def __init__(self, answer: str):
        self.answer = answer

    def detect(self, images, concepts):
        shows = torch.zeros(images.shape[0], len(concepts), dtype=torch.bool)
        if self.answer in concepts:
            shows[:, concepts.index(self.answer)] = True
        return Detection(shows, {"ANSWER": images.shape[0]})

    def embed(self, images):  # mean colour as a 3-d "embedding"
        return torch.nn.functional.normalize(images.mean(dim=(2, 3)), dim=-1)


def test_presence_counts_detector_answers(tiny_sd):
    cfg = EvalConfig(images_per_prompt=3, steps=2, batch_size=2)
    ev = evaluate(tiny_sd, Fixed("square"), CONCEPTS, cfg)
    assert ev.presence == {"circle": 0.0, "square": 1.0}
    assert ev.images == {"circle": 6, "square": 3}  # n: prompts x images_per_prompt
    assert ev.counts == {"circle": {"ANSWER": 6}, "square": {"ANSWER": 3}}
    assert ev.retention("circle") == 1.0 and ev.retention("square") == 0.0
    ev = evaluate(tiny_sd, Fixed("dog"), CONCEPTS, EvalConfig(images_per_prompt=1, steps=2, extra_classes=["dog"]))
    assert ev.presence == {"circle": 0.0, "square": 0.0}


def test_clip_evaluation_is_deterministic(tiny_sd):
    det = load_detector("clip", {"model": "tiny-test", "pretrained": None}, torch.device("cpu"))
    cfg = EvalConfig(images_per_prompt=4, steps=3)
    a = evaluate(tiny_sd, det, CONCEPTS, cfg)
    b = evaluate(tiny_sd, det, CONCEPTS, cfg)
    assert a.presence == b.presence
    assert all(0.0 <= v <= 1.0 for v in a.presence.values())
    assert torch.equal(a.samples["circle"], b.samples["circle"])
    images = tiny_sd.generate(["a circle"] * 3, [0, 1, 2], steps=2, guidance_scale=7.5)
    shows = det.detect(images, ["circle", "square"]).shows
    assert shows.shape == (3, 2) and (shows.sum(-1) == 1).all()  # an argmax over the names: exactly one each


def test_clip_config_validation():
    import pytest
    from pydantic import ValidationError

    from methods.detectors.clip import ClipConfig

    with pytest.raises(ValidationError, match="unknown open_clip model"):
        ClipConfig(model="ViT-Z-99")
    with pytest.raises(ValidationError, match="neither a file nor a tag"):
        ClipConfig(model="ViT-B-32", pretrained="/no/such/file.safetensors")
    with pytest.raises(ValidationError, match="has no"):
        ClipConfig(model="tiny-test", pretrained=None, templates=["a photo"])


def test_grid_png(tmp_path, tiny_sd):
    imgs = tiny_sd.generate(["a", "b"], [0, 1], steps=2, guidance_scale=1.0)
    path = save_grid([("base", [imgs[0], imgs[1]]), ("erased", [imgs[1], imgs[0]])], ["a", "b"], tmp_path / "g.png")
    from PIL import Image

    grid = Image.open(path)
    assert grid.width > 2 * tiny_sd.resolution and grid.height > 2 * tiny_sd.resolution


def test_data_closeness_follows_content():
    """Closeness is the cosine of mean embeddings: data like the concept scores higher than data unlike it."""
    from methods import toyworld as tw

    det = load_detector("toy", {}, torch.device("cpu"))
    pixels = lambda shapes: tw.to_tensor([s.image for s in tw.samples(36, seed=2, shapes=shapes)]) * 2 - 1  # noqa: E731
    cross = mean_embedding(det, pixels(("cross",)))
    assert closeness(cross, mean_embedding(det, pixels(("cross",)))) > 0.99
    others = tuple(s for s in tw.SHAPES if s != "cross")
    with_cross, without = mean_embedding(det, pixels(tw.SHAPES)), mean_embedding(det, pixels(others))
    assert closeness(cross, with_cross) > closeness(cross, without)
    clip = load_detector("clip", {"model": "tiny-test", "pretrained": None}, torch.device("cpu"))
    e = clip.embed(torch.rand(2, 3, 16, 16))
    assert e.shape == (2, 16) and torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5)
