"""`clip`: open_clip zero-shot classification ("a photo of a {}."); the model is an open_clip name with a
pretrained tag or checkpoint path, or `tiny-test`, a random tiny tower for tests.

An image shows concept k when, among the concepts asked about plus the config's `neutral` classes (names of
what an image may show instead: "a landscape", "an object"), concept k has the highest zero-shot score, or
with `threshold`, when its softmax probability over those names (CLIP's logit scale) reaches the threshold
(MACE reports the mean softmax probability over class sets like this one). Without neutral classes the argmax
always names one of the concepts: it cannot say none, which is why a spec with one concept and no other names
is refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from methods.detectors.base import DETECTORS, Detection, Detector, file_sha256, one_hot, package_version

# A random tiny open_clip tower (set head_width on a tiny vision tower: docs/background.md §5).
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _register_tiny_clip() -> None:
    import open_clip

    if "tiny-test" in open_clip.list_models():
        return
    folder = Path(tempfile.mkdtemp(prefix="resurgence-openclip-"))
    (folder / "tiny-test.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "tiny-test.json")


class ClipConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = "ViT-B-32"  # an open_clip model name, or tiny-test (random, for tests)
    pretrained: str | None = "openai"  # open_clip tag (needs its weights cached) or a checkpoint path;
    # null gives random weights (only sensible for tiny-test)
    templates: list[str] = Field(default_factory=lambda: ["a photo of a {}."], min_length=1)  # zero-shot
    seed: int = 0  # seeds random weights (tiny-test)
    neutral: list[str] = Field(default_factory=list)  # names an image may show instead of any concept
    threshold: float | None = Field(None, gt=0, le=1)  # null: argmax; else softmax probability >= threshold

    def can_say_none(self) -> bool:
        return bool(self.neutral) or self.threshold is not None

    def record(self) -> dict[str, Any]:
        p = self.pretrained
        weights = "random" if p is None else (f"sha256:{file_sha256(os.path.expanduser(p))}" if _is_file(p) else p)
        return {
            "package": f"open_clip_torch=={package_version('open_clip_torch')}",
            "model": self.model,
            "weights": weights,
            "templates": " | ".join(self.templates),
            "neutral": " | ".join(self.neutral),
            "decision": "argmax" if self.threshold is None else f"softmax>={self.threshold}",
        }

    @model_validator(mode="after")
    def _known(self) -> ClipConfig:
        import open_clip

        _register_tiny_clip()
        if self.model not in open_clip.list_models():
            raise ValueError(f"model: unknown open_clip model {self.model!r}")
        p = self.pretrained
        if p is not None and not _is_file(p):
            tags = open_clip.list_pretrained_tags_by_model(self.model)
            if p not in tags:
                raise ValueError(
                    f"pretrained: {p!r} is neither a file nor a tag of {self.model} (tags: {', '.join(tags) or 'none'})"
                )
        for t in self.templates:
            if "{}" not in t:
                raise ValueError(f"templates: {t!r} has no {{}} for the class name")
        return self


def _is_file(path: str) -> bool:
    return os.path.isfile(os.path.expanduser(path))


class ClipZeroShot:
    def __init__(self, cfg: ClipConfig, device: torch.device) -> None:
        import open_clip

        _register_tiny_clip()
        torch.manual_seed(cfg.seed)
        pretrained = os.path.expanduser(cfg.pretrained) if cfg.pretrained else None
        self.model, _, preprocess = open_clip.create_model_and_transforms(
            cfg.model, pretrained=pretrained, device=device
        )
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(cfg.model)
        self.templates = list(cfg.templates)
        self.neutral = list(cfg.neutral)
        self.threshold = cfg.threshold
        self.device = device
        pp = open_clip.get_model_preprocess_cfg(self.model)
        size = pp.get("size", 224)
        self.size = tuple(size) if isinstance(size, list | tuple) else (size, size)
        self.mean = torch.tensor(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)), device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(pp.get("std", (0.26862954, 0.26130258, 0.27577711)), device=device).view(1, 3, 1, 1)
        self._heads: dict[tuple[str, ...], torch.Tensor] = {}

    def _head(self, classes: list[str]) -> torch.Tensor:
        key = tuple(classes)
        if key not in self._heads:
            import open_clip

            self._heads[key] = open_clip.build_zero_shot_classifier(
                self.model, self.tokenizer, classes, self.templates, device=self.device
            ).cpu()  # (D, K)
        return self._heads[key]

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.to(self.device).float(), size=self.size, mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        return F.normalize(self.model.encode_image(x), dim=-1).cpu()  # (B, D)

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """(N,) prompts -> (N, D) unit-norm text embeddings (the prompt as it is, no template)."""
        return F.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)), dim=-1).cpu()

    @torch.no_grad()
    def scores(self, images: torch.Tensor, names: list[str]) -> torch.Tensor:
        """(B, len(names)) softmax probabilities of each name (CLIP's logit scale, as in zero-shot ImageNet)."""
        logits = self.model.logit_scale.exp().cpu() * (self.embed(images) @ self._head(names))
        return logits.softmax(dim=-1)

    def detect(self, images: torch.Tensor, concepts: list[str]) -> Detection:
        prob = self.scores(images, list(concepts) + [n for n in self.neutral if n not in concepts])
        k = len(concepts)
        if self.threshold is not None:
            return Detection(prob[:, :k] >= self.threshold)
        best = prob.argmax(dim=-1)
        return Detection(one_hot(torch.where(best < k, best, -1), k))


@DETECTORS.register("clip", config=ClipConfig, description="open_clip zero-shot classifier over concept names")
def clip_detector(cfg: ClipConfig, device: torch.device) -> Detector:
    return ClipZeroShot(cfg, device)
