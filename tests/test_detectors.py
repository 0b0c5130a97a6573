"""The detectors the papers measure with: NudeNet (its real bundled model), an ImageNet classifier (random
weights from a local file), CLIP with neutral classes or a threshold; and their weights-file checks."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from methods import toyworld as tw
from methods.catalog import DETECTORS  # noqa: F401 (registers every detector)
from methods.detectors.base import load_detector
from methods.detectors.clip import ClipConfig, ClipZeroShot
from methods.detectors.imagenet import ImageNetConfig, build
from methods.detectors.nudenet import EXPOSED, LABELS, NudeNetConfig, NudeNetDetector, nudity_hits, to_bgr

CPU = torch.device("cpu")


# -- NudeNet -----------------------------------------------------------------------------------------------
def box(cls: str, score: float) -> dict:
    return {"class": cls, "score": score, "box": [0, 0, 10, 10]}


def test_nudity_rule_on_raw_outputs():
    """An image counts when any configured class has a box at score >= threshold; counts are per image."""
    raw = [
        [box("FEMALE_BREAST_EXPOSED", 0.61), box("FEMALE_BREAST_EXPOSED", 0.9)],  # two boxes, one image
        [box("FEMALE_BREAST_EXPOSED", 0.59), box("FACE_FEMALE", 0.99)],  # below threshold; a class not counted
        [box("BUTTOCKS_EXPOSED", 0.6)],  # exactly at the threshold counts
        [],
        [box("FEET_EXPOSED", 0.95), box("BELLY_COVERED", 0.99)],
    ]
    shows, counts = nudity_hits(raw, list(EXPOSED), 0.6)
    assert shows == [True, False, True, False, True]
    assert counts == {"FEMALE_BREAST_EXPOSED": 1, "BUTTOCKS_EXPOSED": 1, "FEET_EXPOSED": 1}
    # A narrower class set (no feet) and a stricter threshold change the answer as the rule says.
    shows, counts = nudity_hits(raw, ["FEMALE_BREAST_EXPOSED", "BUTTOCKS_EXPOSED"], 0.75)
    assert shows == [True, False, False, False, False] and counts == {"FEMALE_BREAST_EXPOSED": 1}


def test_nudenet_bundled_model_runs_offline_and_finds_nothing_in_the_toy_world():
    det = load_detector("nudenet", {}, CPU)
    images = tw.to_tensor([s.image for s in tw.samples(12, seed=1)])
    assert images.shape[-1] == 16
    found = det.detect(images, ["nudity"])
    assert found.shows.shape == (12, 1) and not found.shows.any() and found.counts == dict.fromkeys(EXPOSED, 0)
    big = torch.nn.functional.interpolate(images[:4], size=(512, 512), mode="nearest")  # at SD v1.4's size
    assert det.raw(big) == [[], [], [], []]


def test_nudenet_detect_reads_its_raw_output(monkeypatch):
    det = NudeNetDetector(NudeNetConfig(threshold=0.5))
    raw = [[box("MALE_GENITALIA_EXPOSED", 0.7)], [box("MALE_GENITALIA_EXPOSED", 0.3)], []]
    monkeypatch.setattr(det, "raw", lambda images: raw)
    found = det.detect(torch.zeros(3, 3, 8, 8), ["cat", "nudity"])
    assert found.shows.tolist() == [[False, True], [False, False], [False, False]]
    assert found.counts == {**dict.fromkeys(EXPOSED, 0), "MALE_GENITALIA_EXPOSED": 1}


def test_nudenet_gets_the_arrays_its_own_scripts_would_read():
    """cv2.imread gives 8-bit BGR: a pure red pixel is (0, 0, 255)."""
    img = torch.zeros(1, 3, 2, 2)
    img[:, 0] = 1.0
    arr = to_bgr(img)[0]
    assert arr.dtype == np.uint8 and arr.shape == (2, 2, 3) and arr[0, 0].tolist() == [0, 0, 255]


def test_nudenet_config():
    with pytest.raises(ValidationError, match="not a NudeNet class"):
        NudeNetConfig(classes=["BREAST_EXPOSED"])
    assert set(EXPOSED) <= set(LABELS) and len(EXPOSED) == 9
    with pytest.raises(ValueError, match="'cat' is not what nudenet judges"):
        NudeNetConfig().check_concepts(["nudity", "cat"])
    rec = NudeNetConfig(threshold=0.75).record()
    assert rec["package"] == "nudenet==3.4.2" and rec["threshold"] == 0.75 and rec["weights"].startswith("320n.onnx")


# -- ImageNet classifier -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    torch.manual_seed(0)
    net = build("resnet18")
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path, net.eval()


def test_imagenet_detector_is_top_k_of_the_classifier(resnet18_file):
    """Presence against the network run directly: resize the shorter side to 256, centre-crop 224, normalise."""
    path, net = resnet18_file
    images = torch.rand(5, 3, 64, 48)
    x = torch.nn.functional.interpolate(images, size=(341, 256), mode="bilinear", antialias=True)
    x = x[..., 58:282, 16:240]
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )
    with torch.no_grad():
        logits = net((x - mean) / std)
    top1, top3 = logits.argmax(-1), logits.topk(3, -1).indices
    # Concepts by the ImageNet class each image's top-1 is, and one no image shows.
    names = ["tench", "goldfish"]
    classes = {"first": [int(top1[0])], "second": [int(top1[1]), int(top1[2])], "tench": [0]}
    det = load_detector("imagenet", {"weights": str(path), "arch": "resnet18", "classes": classes, "resize": 256}, CPU)
    shows = det.detect(images, ["first", "second", "tench"]).shows
    expect = torch.stack([top1 == top1[0], (top1 == top1[1]) | (top1 == top1[2]), top1 == 0], dim=1)
    assert torch.equal(shows, expect)
    det3 = load_detector("imagenet", {"weights": str(path), "arch": "resnet18", "top_k": 3, "resize": 256}, CPU)
    shows3 = det3.detect(images, names).shows
    assert torch.equal(shows3, torch.stack([(top3 == 0).any(-1), (top3 == 1).any(-1)], dim=1))
    emb = det.embed(images)
    assert emb.shape == (5, 512) and torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_imagenet_classes_by_name_index_and_imagenette(resnet18_file):
    path, _ = resnet18_file
    cfg = ImageNetConfig(weights=str(path), arch="resnet18", classes="imagenette")
    assert [cfg.indices(n) for n in ("chainsaw", "English springer", "golf ball", "church")] == [
        [491],
        [217],
        [574],
        [497],
    ]
    assert ImageNetConfig(weights=str(path), arch="resnet18").indices("Tench") == [0]
    with pytest.raises(ValueError, match="'unicorn' is not an ImageNet class name"):
        cfg.check_concepts(["tench", "unicorn"])
    with pytest.raises(ValidationError, match="ImageNet index 1000 is not in 0..999"):
        ImageNetConfig(weights=str(path), arch="resnet18", classes={"x": [1000]})
    assert cfg.record()["weights"].startswith("sha256:") and cfg.record()["decision"] == "top-1"


def test_weights_files_are_checked_before_compute(resnet18_file, tmp_path):
    path, net = resnet18_file
    with pytest.raises(ValidationError, match=r"not resnet50 weights \(missing"):
        ImageNetConfig(weights=str(path), arch="resnet50")  # resnet18's weights for a resnet50
    state = tmp_path / "state.pt"
    torch.save(net.state_dict(), state)  # a weights-only state dict loads
    assert ImageNetConfig(weights=str(state), arch="resnet18").record()["arch"] == "resnet18"
    pickled = tmp_path / "module.pt"
    torch.save(net, pickled)  # a whole pickled module needs code to load: refused
    with pytest.raises(ValidationError, match="not loadable as weights only"):
        ImageNetConfig(weights=str(pickled), arch="resnet18")
    with pytest.raises(ValidationError, match="no such file"):
        ImageNetConfig(weights=str(tmp_path / "none.safetensors"))
    with pytest.raises(ValidationError, match="not a torchvision classification model"):
        ImageNetConfig(weights=None, arch="resnet9000")


# -- CLIP that can say none ----------------------------------------------------------------------------------
def test_clip_neutral_classes_and_threshold_follow_the_softmax():
    """Against the zero-shot softmax computed here: argmax over concepts + neutral names, or a threshold."""
    import open_clip

    cfg = ClipConfig(model="tiny-test", pretrained=None, neutral=["a texture", "a landscape"])
    assert not ClipConfig(model="tiny-test", pretrained=None).can_say_none() and cfg.can_say_none()
    det = ClipZeroShot(cfg, CPU)
    images = torch.rand(6, 3, 32, 32)
    names = ["circle", "a texture", "a landscape"]
    with torch.no_grad():
        x = torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False)
        x = (x - det.mean) / det.std
        img = torch.nn.functional.normalize(det.model.encode_image(x), dim=-1)
        text = torch.nn.functional.normalize(
            det.model.encode_text(
                open_clip.tokenize(["a photo of a circle."] + [f"a photo of a {n}." for n in names[1:]])
            ),
            dim=-1,
        )
        prob = (det.model.logit_scale.exp() * img @ text.T).softmax(-1)
    shows = det.detect(images, ["circle"]).shows[:, 0]
    assert torch.equal(shows, prob.argmax(-1) == 0)
    at = float(prob[:, 0].median())
    det_t = ClipZeroShot(cfg.model_copy(update={"threshold": at}), CPU)
    assert torch.equal(det_t.detect(images, ["circle"]).shows[:, 0], prob[:, 0] >= at)
