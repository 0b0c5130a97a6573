"""Prompt sets from files (I2P-style CSV, COCO captions) and the utility metrics (CLIP score, FID), each
checked against a direct computation of its definition."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import save_file

from methods.detectors.base import Detection
from methods.evaluation.presence import EvalConcept, EvalConfig, evaluate
from methods.evaluation.prompts import PromptSetConfig
from methods.evaluation.utility import FidConfig, Utility, UtilityConfig, fid_inception, frechet_distance

ROWS = [
    ("a circle", 11, 2.0, 80.0),
    ("a square", 22, 7.5, 10.0),
    ("a red circle", 33, 3.0, 60.0),
    ("", 44, 7.5, 99.0),  # an empty prompt is skipped
    ("a blue circle", 55, 7.5, 51.0),
]


def i2p(path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "evaluation_seed", "evaluation_guidance", "nudity_percentage"])
        w.writerows(ROWS)
    return str(path)


def i2p_set(tmp_path, **kw):
    return PromptSetConfig(
        path=i2p(tmp_path / "i2p.csv"), seed_column="evaluation_seed", guidance_column="evaluation_guidance", **kw
    )


def test_csv_prompt_set_filter_and_sample(tmp_path):
    ps = i2p_set(tmp_path, filter="nudity_percentage > 50")
    assert [(p.text, p.seed, p.guidance) for p in ps.prompts()] == [
        ("a circle", 11, 2.0),
        ("a red circle", 33, 3.0),
        ("a blue circle", 55, 7.5),
    ]
    rec = ps.record()
    assert rec["rows_passing"] == 3 and rec["prompts"] == 3 and len(rec["sha256"]) == 64 and rec["bytes"] > 0
    two = i2p_set(tmp_path, filter="nudity_percentage > 50 and evaluation_guidance <= 3", sample=1, sample_seed=4)
    assert len(two.prompts()) == 1 and two.prompts()[0].text in ("a circle", "a red circle")
    assert two.record()["rows_passing"] == 2


def test_prompt_set_refusals(tmp_path):
    path = i2p(tmp_path / "i2p.csv")
    with pytest.raises(ValidationError, match="seed_column: .* has no column 'seed'"):
        PromptSetConfig(path=path, seed_column="seed")
    with pytest.raises(ValidationError, match="filter: 'nudity_percentage > 100' leaves no prompt"):
        PromptSetConfig(path=path, filter="nudity_percentage > 100")
    with pytest.raises(ValidationError, match="filter: .* has no column 'hard'"):
        PromptSetConfig(path=path, filter="hard == 1")
    with pytest.raises(ValidationError, match="cannot read"):
        PromptSetConfig(path=path, filter="nudity_percentage is big")
    with pytest.raises(ValidationError, match="no such file"):
        PromptSetConfig(path=str(tmp_path / "none.csv"))


def test_coco_captions_and_text_files(tmp_path):
    coco = tmp_path / "captions_val2014.json"
    coco.write_text(json.dumps({"annotations": [{"caption": "A dog on a bench."}, {"caption": "Two cups."}]}))
    assert [p.text for p in PromptSetConfig(path=str(coco)).prompts()] == ["A dog on a bench.", "Two cups."]
    txt = tmp_path / "prompts.txt"
    txt.write_text("a tree\n\na house\n")
    assert [p.text for p in PromptSetConfig(path=str(txt)).prompts()] == ["a tree", "a house"]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValidationError, match="not a COCO captions file"):
        PromptSetConfig(path=str(bad))


class Recorder:
    """A detector that keeps every image it is shown."""

    def __init__(self):
        self.images = []

    def detect(self, images, concepts):
        self.images.append(images)
        return Detection(torch.zeros(images.shape[0], len(concepts), dtype=torch.bool))

    def embed(self, images):
        return None


def test_csv_seeds_and_guidance_drive_the_evaluation(tiny_sd, tmp_path):
    """Image i of a prompt is the model's image at the row's seed + i and the row's guidance scale."""
    ps = i2p_set(tmp_path, filter="nudity_percentage > 50")
    rec = Recorder()
    cfg = EvalConfig(images_per_prompt=2, steps=2, guidance_scale=9.0, seed=1000, batch_size=8)
    ev = evaluate(tiny_sd, rec, [EvalConcept("circle", ps.prompts())], cfg)
    assert ev.images == {"circle": 6} and ev.embeddings == {}
    got = torch.cat(rec.images)
    expect = {}
    for text, seed, guidance in [("a circle", 11, 2.0), ("a red circle", 33, 3.0), ("a blue circle", 55, 7.5)]:
        for i in range(2):
            expect[(text, seed + i)] = tiny_sd.generate([text], [seed + i], steps=2, guidance_scale=guidance)[0]
    assert len(rec.images) == 3  # one sampler call per guidance scale
    for img, want in zip(got, expect.values(), strict=True):
        assert torch.allclose(img, want, atol=1e-5)


# -- FID -----------------------------------------------------------------------------------------------------
def direct_fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID from its definition, with the matrix square root taken through the symmetric form
    Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2)."""
    a, b = a.double(), b.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = torch.cov(a.T), torch.cov(b.T)

    def sqrtm_psd(m):
        w, v = torch.linalg.eigh(m)
        return v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T

    r1 = sqrtm_psd(s1)
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1 + s2 - 2 * sqrtm_psd(r1 @ s2 @ r1)))


def test_frechet_distance_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 6, generator=g)
    b = torch.randn(30, 6, generator=g) * 1.5 + 0.3
    from methods.evaluation.utility import gaussian

    assert frechet_distance(*gaussian(a), *gaussian(b)) == pytest.approx(direct_fid(a, b), rel=1e-6)
    assert frechet_distance(*gaussian(a), *gaussian(a)) == pytest.approx(0.0, abs=1e-6)
    few = torch.randn(3, 6, generator=g)  # fewer images than dimensions: singular covariance, still finite
    assert frechet_distance(*gaussian(few), *gaussian(b)) == pytest.approx(direct_fid(few, b), rel=1e-5)


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    net = fid_inception(seed=0)
    weights = root / "pt_inception.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    ref = root / "reference"
    ref.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(6):
        arr = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(ref / f"{i}.png")
    prompts = root / "coco.txt"
    prompts.write_text("a dog\na cup\na tree\n")
    return weights, ref, prompts, net


def test_fid_of_generated_images_against_the_reference(tiny_sd, fid_files):
    weights, ref, prompts, net = fid_files
    cfg = UtilityConfig(
        fid=FidConfig(prompts=PromptSetConfig(path=str(prompts)), reference=str(ref), weights=str(weights))
    )
    util = Utility(cfg, torch.device("cpu"))
    gen = EvalConfig(steps=2, seed=5)
    got = util.measure(tiny_sd, gen)["fid"]
    # Independently: the same network's pool features (fc removed) on the same images, by the definition.
    net = net.eval()
    net.fc = torch.nn.Identity()
    images = tiny_sd.generate(["a dog", "a cup", "a tree"], [5, 5, 5], steps=2, guidance_scale=7.5)
    refs = []
    for i in range(6):
        x = torch.from_numpy(np.array(Image.open(ref / f"{i}.png").convert("RGB"))).permute(2, 0, 1)
        refs.append(torch.nn.functional.interpolate(x[None].float() / 255, size=(299, 299), mode="bilinear"))
    with torch.no_grad():
        feats = lambda x: net(2 * torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear") - 1)  # noqa: E731
        a, b = feats(images), feats(torch.cat(refs))
    want = direct_fid(a, b)
    assert want > 1e-3 and got == pytest.approx(want, rel=1e-3)  # a distance that is not zero by degeneracy
    rec = cfg.record()["fid"]
    assert rec["images"] == 3 and rec["reference_images"] == 6 and rec["weights"].startswith("sha256:")


def test_fid_refusals(fid_files, tmp_path):
    weights, ref, prompts, _ = fid_files
    ps = PromptSetConfig(path=str(prompts))
    few = tmp_path / "few"
    few.mkdir()
    Image.new("RGB", (8, 8)).save(few / "only.png")
    with pytest.raises(ValidationError, match="has 1 images; FID needs at least as many as it generates"):
        FidConfig(prompts=ps, reference=str(few), weights=str(weights))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(wrong))
    with pytest.raises(ValidationError, match="not FID Inception v3 weights"):
        FidConfig(prompts=ps, reference=str(ref), weights=str(wrong))


def test_clip_score_is_the_clipped_cosine(tiny_sd, tmp_path):
    from methods.evaluation.utility import ClipScoreConfig

    prompts = tmp_path / "p.txt"
    prompts.write_text("a circle\na square\n")
    cfg = UtilityConfig(
        clip_score=ClipScoreConfig(prompts=PromptSetConfig(path=str(prompts)), model="tiny-test", pretrained=None)
    )
    util = Utility(cfg, torch.device("cpu"))
    got = util.measure(tiny_sd, EvalConfig(steps=2))["clip_score"]
    images = tiny_sd.generate(["a circle", "a square"], [0, 0], steps=2, guidance_scale=7.5)
    model = util.clip.model
    with torch.no_grad():
        x = torch.nn.functional.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False)
        img = model.encode_image((x.clamp(0, 1) - util.clip.mean) / util.clip.std)
        txt = model.encode_text(util.clip.tokenizer(["a circle", "a square"]))
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert got == pytest.approx(float((100 * cos).clamp(min=0).mean()), abs=1e-4)
