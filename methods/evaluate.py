"""Concept presence on generated images, and the detectors that decide it.

presence(c) = fraction of images generated from concept c's prompts that the detector assigns to c,
among the classes {all concepts of the experiment} + extra classes (docs/background.md §4).
retention   = mean presence of the *other* concepts on their own prompts (utility / specificity).
resurgence  = presence after fine-tuning - presence right after erasure (computed by the trial).

Images use fixed seeds (image i of every prompt uses seed + i): the same model gives the same numbers,
and different models are compared on the same noise (common random numbers).

Detectors: `clip` is open_clip zero-shot ("a photo of a {}."); the model is an open_clip name with a
pretrained tag or checkpoint path, or `tiny-test`, a random tiny tower for tests.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, model_validator

from methods.datasets import to_images
from methods.erasing import Concept  # noqa: F401  (re-exported: evaluations take concepts)
from methods.models import DiffusionModel
from methods.registry import Registry


class Detector(Protocol):
    def classify(self, images: torch.Tensor, classes: list[str]) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B,) index into `classes` of the class each image shows."""
        ...

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) unit-norm image embeddings (data closeness covariate)."""
        ...


DETECTORS: Registry[Callable[[Any, torch.device], Detector]] = Registry("detector")

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

    @model_validator(mode="after")
    def _known(self) -> ClipConfig:
        import open_clip

        _register_tiny_clip()
        if self.model not in open_clip.list_models():
            raise ValueError(f"model: unknown open_clip model {self.model!r}")
        p = self.pretrained
        if p is not None and not os.path.isfile(os.path.expanduser(p)):
            tags = open_clip.list_pretrained_tags_by_model(self.model)
            if p not in tags:
                raise ValueError(
                    f"pretrained: {p!r} is neither a file nor a tag of {self.model} (tags: {', '.join(tags) or 'none'})"
                )
        for t in self.templates:
            if "{}" not in t:
                raise ValueError(f"templates: {t!r} has no {{}} for the class name")
        return self


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
            )  # (D, K)
        return self._heads[key]

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.to(self.device).float(), size=self.size, mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        return F.normalize(self.model.encode_image(x), dim=-1)  # (B, D)

    @torch.no_grad()
    def classify(self, images: torch.Tensor, classes: list[str]) -> torch.Tensor:
        return (self.embed(images) @ self._head(classes)).argmax(dim=-1).cpu()


@DETECTORS.register("clip", config=ClipConfig, description="open_clip zero-shot classifier over concept names")
def clip_detector(cfg: ClipConfig, device: torch.device) -> Detector:
    return ClipZeroShot(cfg, device)


def load_detector(name: str, options: BaseModel | dict[str, Any] | None, device: torch.device) -> Detector:
    """A registered detector; `options` is its typed config (as the spec validated it) or a mapping for it."""
    entry = DETECTORS.get(name)
    cfg = (
        options
        if isinstance(options, BaseModel) or entry.config is None
        else entry.config.model_validate(options or {})
    )
    return entry.obj(cfg, device)


# -- presence -----------------------------------------------------------------------------------------
class EvalConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    images_per_prompt: int = Field(2, ge=1)  # papers use 25-100 images per concept in all
    steps: int = Field(20, ge=1)  # DDIM steps per image
    guidance_scale: float = Field(7.5, ge=0)
    seed: int = 0  # image i of every prompt uses seed + i
    batch_size: int = Field(16, ge=1)  # images generated at once
    extra_classes: list[str] = Field(default_factory=list)  # more class names for the detector to choose


@dataclass(frozen=True)
class Evaluation:
    presence: dict[str, float]  # concept name -> presence
    samples: dict[str, torch.Tensor]  # concept name -> its first image, (3, H, W) in [0, 1]
    embeddings: dict[str, torch.Tensor]  # concept name -> mean detector embedding of its images, (D,);
    # only when asked for (evaluate(..., embed=True)): it costs a second pass of the detector

    def retention(self, erased: str) -> float:
        others = [v for k, v in self.presence.items() if k != erased]
        return sum(others) / len(others) if others else float("nan")


def evaluate(
    model: DiffusionModel, detector: Detector, concepts: list[Concept], cfg: EvalConfig, *, embed: bool = False
) -> Evaluation:
    classes = [c.name for c in concepts] + list(cfg.extra_classes)
    presence: dict[str, float] = {}
    samples: dict[str, torch.Tensor] = {}
    embeddings: dict[str, torch.Tensor] = {}
    for k, concept in enumerate(concepts):
        jobs = [(p, cfg.seed + i) for p in concept.prompts for i in range(cfg.images_per_prompt)]
        hits = 0
        total = None
        for start in range(0, len(jobs), cfg.batch_size):
            chunk = jobs[start : start + cfg.batch_size]
            images = model.generate(
                [p for p, _ in chunk], [s for _, s in chunk], steps=cfg.steps, guidance_scale=cfg.guidance_scale
            )
            if start == 0:
                samples[concept.name] = images[0]
            hits += int((detector.classify(images, classes) == k).sum())
            if embed:
                summed = detector.embed(images).sum(0).cpu()
                total = summed if total is None else total + summed
        presence[concept.name] = hits / len(jobs)
        if embed:
            embeddings[concept.name] = total / len(jobs)
    return Evaluation(presence, samples, embeddings)


@torch.no_grad()
def mean_embedding(detector: Detector, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Mean detector embedding (D,) of images (N, 3, H, W) in [-1, 1] (a dataset's pixels)."""
    total = None
    for start in range(0, pixels.shape[0], batch_size):
        summed = detector.embed((pixels[start : start + batch_size] + 1) / 2).sum(0).cpu()
        total = summed if total is None else total + summed
    return total / pixels.shape[0]


def closeness(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine between two mean embeddings: how close a fine-tuning set is to a concept (docs/background.md §4)."""
    return float(F.cosine_similarity(a.float(), b.float(), dim=0))


def data_closeness(detector: Detector, pixel_sets: list[torch.Tensor], concept: torch.Tensor) -> float:
    """Closeness of all the images of several datasets ((N_i, 3, H, W) in [-1, 1]) to a concept's mean embedding."""
    return closeness(mean_embedding(detector, torch.cat(pixel_sets)), concept)


def save_grid(rows: list[tuple[str, list[torch.Tensor]]], columns: list[str], path: Path, scale: int = 2) -> Path:
    """A labelled PNG grid: one row per stage (e.g. base / erased / fine-tuned), one column per concept."""
    images = [[to_images(img.unsqueeze(0))[0] for img in row] for _, row in rows]
    side = max(img.width for row in images for img in row) * scale
    label_w, head_h = 90, 14
    grid = Image.new("RGB", (label_w + side * len(columns), head_h + side * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(columns):
        draw.text((label_w + j * side + 2, 1), name[: max(4, side // 6)], fill="black")
    for i, ((label, _), row) in enumerate(zip(rows, images, strict=True)):
        draw.text((2, head_h + i * side + side // 2 - 5), label, fill="black")
        for j, img in enumerate(row):
            grid.paste(img.resize((side, side), Image.Resampling.NEAREST), (label_w + j * side, head_h + i * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


# -- persistence (the erase cache stores the erased model's evaluation next to its weights) ------------
def save_evaluation(ev: Evaluation, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evaluation.json").write_text(json.dumps({"presence": ev.presence}))
    tensors = {f"sample.{k}": v.contiguous() for k, v in ev.samples.items()}
    tensors |= {f"embedding.{k}": v.contiguous() for k, v in ev.embeddings.items()}
    save_file(tensors, str(folder / "evaluation.safetensors"))


def load_evaluation(folder: Path) -> Evaluation:
    from safetensors.torch import load_file

    presence = json.loads((folder / "evaluation.json").read_text())["presence"]
    tensors = load_file(str(folder / "evaluation.safetensors"))
    pick = lambda prefix: {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    return Evaluation(presence, pick("sample."), pick("embedding."))


# -- the cheap resurgence signal ------------------------------------------------------------------------
class ProxyConfig(BaseModel):
    """The denoising probe: the diffusion loss on the base model's own images of the erased concept, on
    fixed noise and timesteps (common random numbers: every trial and every rung sees the same draws)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    images_per_prompt: int = Field(1, ge=1)  # base-model images per concept prompt (drawn once per worker)
    repeats: int = Field(4, ge=1)  # fixed (noise, timestep) draws per image; more = smoother signal
    seed: int = 1000  # seeds of the probe's images and noise (apart from the evaluation's)


@dataclass(frozen=True)
class Probe:
    latents: torch.Tensor  # (N, C, h, w): the base model's images of the concept, as latents
    prompts: list[str]  # (N,) the prompt of each
    cfg: ProxyConfig


@torch.no_grad()
def make_probe(base: DiffusionModel, prompts: list[str], cfg: ProxyConfig, eval_cfg: EvalConfig) -> Probe:
    jobs = [(p, cfg.seed + i) for p in prompts for i in range(cfg.images_per_prompt)]
    pixels = base.generate(
        [p for p, _ in jobs], [s for _, s in jobs], steps=eval_cfg.steps, guidance_scale=eval_cfg.guidance_scale
    )  # (N, 3, H, W) in [0, 1]
    latents = base.latents_of(pixels * 2 - 1, torch.Generator("cpu").manual_seed(cfg.seed))
    return Probe(latents, [p for p, _ in jobs], cfg)


def save_probe(probe: Probe, loss: float, folder: Path) -> None:
    """The probe's images (as latents), prompts and the base model's loss on it, beside an evaluation."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    meta = {"prompts": probe.prompts, "cfg": probe.cfg.model_dump(), "loss": loss}
    (folder / "probe.json").write_text(json.dumps(meta))
    save_file({"latents": probe.latents.contiguous()}, str(folder / "probe.safetensors"))


def load_probe(folder: Path) -> tuple[Probe, float]:
    from safetensors.torch import load_file

    meta = json.loads((folder / "probe.json").read_text())
    latents = load_file(str(folder / "probe.safetensors"))["latents"]
    return Probe(latents, list(meta["prompts"]), ProxyConfig.model_validate(meta["cfg"])), float(meta["loss"])


@torch.no_grad()
def probe_loss(model: DiffusionModel, probe: Probe) -> float:
    """Mean denoising loss of `model` on the probe; lower = the model draws the concept more like the base."""
    cond = model.encode(probe.prompts)
    latents = probe.latents.to(model.device)
    total = 0.0
    for r in range(probe.cfg.repeats):
        gen = torch.Generator("cpu").manual_seed(probe.cfg.seed + r)  # the same draws for every model
        with model.autocast():
            total += float(model.denoising_loss(latents, cond, gen))
    return total / probe.cfg.repeats


def proxy_resurgence(loss_now: float, loss_erased: float, loss_base: float) -> float:
    """How far the probe loss has come back from the erased model's towards the base model's:
    0 right after erasure, 1 when the concept is denoised as well as before erasure (can exceed both)."""
    gap = loss_erased - loss_base
    if abs(gap) < 1e-12:
        return 0.0
    return (loss_erased - loss_now) / gap
