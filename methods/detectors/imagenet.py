"""`imagenet`: an ImageNet classifier (a torchvision architecture, ResNet-50 by default, as ESD and UCE count
erased objects with) with weights from a local file: safetensors or a weights-only state dict.

An image shows concept k when one of the ImageNet classes the concept stands for is among the classifier's
`top_k` predictions (top-1 by default: the papers report top-1 accuracy on the erased class). A concept
stands for the classes `classes` maps it to (ImageNet indices or names), else for the ImageNet class of its
own name; `classes: imagenette` maps the ten Imagenette classes (the few-shot erasure paper's set) by their
names and common spellings. Preprocessing is torchvision's ImageNet evaluation transform: resize the shorter
side to `resize` (bilinear, antialiased), centre-crop `crop`, normalise with the ImageNet mean and standard
deviation. The defaults (232, 224) are those of torchvision's ResNet-50 IMAGENET1K_V2 weights, which ESD's
official eval-scripts/imageclassify.py (rohitgandikota/erasing) loads as ResNet50_Weights.DEFAULT and reads
the top-5 of; it reports the top-1 hit rate of the erased class.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from methods.detectors.base import DETECTORS, Detection, Detector, file_sha256, package_version
from methods.weights import WeightsError, check_fits, load_into, read_state_dict

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Imagenette's ten classes: ImageNet index by the names people write them with.
IMAGENETTE = {
    "tench": 0,
    "english springer": 217,
    "english springer spaniel": 217,
    "springer spaniel": 217,
    "cassette player": 482,
    "chain saw": 491,
    "chainsaw": 491,
    "church": 497,
    "french horn": 566,
    "garbage truck": 569,
    "gas pump": 571,
    "golf ball": 574,
    "parachute": 701,
}


def imagenet_names() -> list[str]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def build(arch: str) -> torch.nn.Module:
    import torchvision

    return torchvision.models.get_model(arch, weights=None, num_classes=1000)


def classifier_archs() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


class ImageNetConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    weights: str | None  # local file: safetensors or a weights-only state dict of `arch`; null: random
    # weights (seeded; smoke tests only: such a classifier recognises nothing)
    arch: str = "resnet50"  # a torchvision classification architecture (resurgence list shows them)
    classes: dict[str, list[int | str]] | Literal["imagenette"] = Field(default_factory=dict)  # concept ->
    # ImageNet indices or names; `imagenette` for its ten classes; a concept not listed is its own name
    top_k: int = Field(1, ge=1, le=1000)
    resize: int = Field(232, ge=8)  # shorter side before the crop (232: torchvision's IMAGENET1K_V2 transform,
    # which ESD's eval-scripts/imageclassify.py uses with ResNet50_Weights.DEFAULT; V1 weights were made at 256)
    crop: int = Field(224, ge=8)
    batch_size: int = Field(32, ge=1)
    seed: int = 0  # seeds random weights

    _sha256: str = PrivateAttr("")

    @model_validator(mode="after")
    def _check(self) -> ImageNetConfig:
        if self.arch not in classifier_archs():
            raise ValueError(f"arch: {self.arch!r} is not a torchvision classification model")
        if self.crop > self.resize:
            raise ValueError(f"crop: {self.crop} is larger than resize ({self.resize})")
        if isinstance(self.classes, dict):
            for concept, picks in self.classes.items():
                if not picks:
                    raise ValueError(f"classes: {concept!r} maps to no ImageNet class")
                for p in picks:
                    _index(p, f"classes.{concept}")
        if self.weights is None:
            return self
        try:
            with torch.device("meta"):
                net = build(self.arch)
            check_fits(net, read_state_dict(self.weights, meta_only=True), self.weights, self.arch)
        except WeightsError as err:
            raise ValueError(f"weights: {err}") from None
        self._sha256 = file_sha256(os.path.expanduser(self.weights))
        return self

    def indices(self, concept: str) -> list[int]:
        """The ImageNet classes a concept stands for (ValueError naming the concept when none)."""
        if isinstance(self.classes, dict) and concept in self.classes:
            return [_index(p, f"classes.{concept}") for p in self.classes[concept]]
        if self.classes == "imagenette" and concept.lower() in IMAGENETTE:
            return [IMAGENETTE[concept.lower()]]
        return [_index(concept, "")]

    def can_say_none(self) -> bool:
        return True  # the other ImageNet classes

    def check_concepts(self, names: list[str]) -> None:
        for name in names:
            self.indices(name)

    def record(self) -> dict[str, Any]:
        return {
            "package": f"torchvision=={package_version('torchvision')}",
            "arch": self.arch,
            "weights": f"sha256:{self._sha256}" if self.weights else f"random (seed {self.seed})",
            "decision": f"top-{self.top_k}",
            "preprocess": f"resize {self.resize}, crop {self.crop}",
            "classes": self.classes if isinstance(self.classes, str) else str(self.classes),
        }


def _index(pick: int | str, where: str) -> int:
    if isinstance(pick, int):
        if not 0 <= pick < 1000:
            raise ValueError(f"{where + ': ' if where else ''}ImageNet index {pick} is not in 0..999")
        return pick
    names = [n.lower() for n in imagenet_names()]
    if pick.lower() in names:
        return names.index(pick.lower())
    raise ValueError(
        f"{where + ': ' if where else ''}{pick!r} is not an ImageNet class name (map it in "
        "evaluate.detector.config.classes, by index or name, or use classes: imagenette)"
    )


class ImageNetClassifier:
    def __init__(self, cfg: ImageNetConfig, device: torch.device) -> None:
        torch.manual_seed(cfg.seed)
        net = build(cfg.arch)
        self.net = (load_into(net, cfg.weights, cfg.arch) if cfg.weights else net).eval().to(device)
        self.cfg, self.device = cfg, device
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
        self._features: torch.Tensor | None = None
        head = [m for m in self.net.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.register_forward_pre_hook(self._keep)  # the pooled features the final layer reads: embeddings

    def _keep(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._features = args[0]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device).float().clamp(0, 1)
        h, w = x.shape[-2:]
        scale = self.cfg.resize / min(h, w)
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True)
        top, left = (x.shape[-2] - self.cfg.crop) // 2, (x.shape[-1] - self.cfg.crop) // 2
        x = x[..., top : top + self.cfg.crop, left : left + self.cfg.crop]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        step = self.cfg.batch_size
        return torch.cat([self.net(self.preprocess(images[i : i + step])) for i in range(0, len(images), step)]).cpu()

    def detect(self, images: torch.Tensor, concepts: list[str]) -> Detection:
        top = self.logits(images).topk(self.cfg.top_k, dim=-1).indices  # (B, k)
        shows = torch.zeros(images.shape[0], len(concepts), dtype=torch.bool)
        for j, concept in enumerate(concepts):
            want = torch.tensor(self.cfg.indices(concept))
            shows[:, j] = torch.isin(top, want).any(dim=-1)
        return Detection(shows)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        self.net(self.preprocess(images))
        return F.normalize(self._features.flatten(1).float(), dim=-1).cpu()  # type: ignore[union-attr]


@DETECTORS.register("imagenet", config=ImageNetConfig, description="torchvision ImageNet classifier, local weights")
def imagenet_detector(cfg: ImageNetConfig, device: torch.device) -> Detector:
    return ImageNetClassifier(cfg, device)
