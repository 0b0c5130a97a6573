"""Few-shot text-encoder erasure (Fuchi & Takagi, BMVC 2024, arXiv 2405.07288).

Only the text encoder changes. From a few images of the concept, the denoising loss is *ascended* with
respect to the text encoder (the Textual-Inversion loss, negated; paper eq. 2):

    L = - E_{t, eps} || eps - eps_theta(z_t, t, TE(prompt)) ||^2,   prompt = a random template with the concept

t uniform over the training timesteps. The concept drifts to a latent neighbour rather than to a chosen
anchor. Trainable subsets (official `freeze_and_unfreeze_text_encoder`): every MLP `fc1`/`fc2` plus the last
layer's self-attention (`mlp-final-attn`, the paper's choice), `all`, `mlp-only`, `attn-only`, `mlp-attn`.
On SDXL both text encoders train (the last layer is found per encoder; the official code is SD-1.x only).
The zero-shot variant replaces the images' latents with uniform random latents (official `torch.rand`).

Defaults are the official train.py's: Adam lr 1e-5, betas (0.9, 0.98), eps 1e-6, weight decay 1e-8,
batch 2, 5 epochs over 4 images (10 steps). Deviations: the random horizontal flip is drawn once per image
as in the official dataset, but from a seeded generator; `templates: concept` uses the concept's own prompts
(useful where the model only knows its own captions, as in the toy world). The paper's premise is a few
*real* images (train.py reads every image of its --data folder): preset `fewshot` needs `image_folder`, and a
config that lets the base model draw the images runs with a warning. Images are resized on the short side
and centre-cropped; train.py squashes them to 512 x 512 (the same for square photos).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import ConfigDict, Field, field_validator

from methods.erasers.base import METHODS, EraseRequest, EraseResult, Method, concept_pixels, run_objective
from methods.models import DiffusionModel
from methods.presets import Preset, Presets

# Textual Inversion's templates, as the official code uses them (27 object, 19 style).
OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]  # fmt: skip
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
]  # fmt: skip

Subset = Literal["mlp-final-attn", "all", "mlp-only", "attn-only", "mlp-attn"]


class FewShotConfig(Presets):
    model_config = ConfigDict(frozen=True, extra="forbid")

    PRESETS = {
        "fewshot": Preset(
            {
                "subset": "mlp-final-attn",
                "lr": 1e-5,
                "beta1": 0.9,
                "beta2": 0.98,
                "eps": 1e-6,
                "weight_decay": 1e-8,
                "batch_size": 2,
                "epochs": 5,
                "images": 4,
                "templates": "object",
                "zero_shot": False,
                "flip": True,
            },
            "fmp453/few-shot-erasing train.py, utils.py, data.py",
            needs=("image_folder",),
            note="train.py takes every image of the folder (the README's example has 4); here the first `images`",
        ),
    }

    subset: Subset = "mlp-final-attn"  # which text-encoder weights train (paper's choice)
    lr: float = Field(1e-5, gt=0)  # Adam (official)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0)
    weight_decay: float = Field(1e-8, ge=0)  # Adam's coupled L2 (official)
    batch_size: int = Field(2, ge=1)
    epochs: int = Field(5, ge=1)  # passes over the images (official 5; README example 4)
    images: int = Field(4, ge=1)  # images of the concept (drawn by the base model unless a folder is given)
    image_folder: str | None = None  # a folder with one subfolder of images per concept name
    image_steps: int = Field(25, ge=1)  # sampling steps for drawn images
    image_guidance: float = Field(7.5, ge=0)
    templates: Literal["object", "style", "concept"] = "object"  # prompt templates (concept: its own prompts)
    zero_shot: bool = False  # random latents instead of images (the paper's zero-shot variant)
    flip: bool = True  # random horizontal flip, drawn once per image (official)

    def warnings(self) -> list[str]:
        if self.image_folder is None and not self.zero_shot:
            return [
                "the concept's images are drawn by the base model, not real photos (the method's premise is a few "
                "real images): give image_folder"
            ]
        return []

    @field_validator("image_folder")
    @classmethod
    def _is_dir(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_dir():
            raise ValueError(f"{v}: no such folder")
        return v


def trainable_parameters(model: DiffusionModel, subset: Subset) -> dict[str, torch.nn.Parameter]:
    """The subset's text-encoder parameters (both encoders on SDXL), by model-wide name."""
    chosen = {}
    for key, encoder in model.modules().items():
        if not key.startswith("text_encoder"):
            continue
        last = encoder.config.num_hidden_layers - 1
        for name, p in encoder.named_parameters():
            mlp = "mlp.fc" in name
            attn = ".self_attn." in name
            final_attn = re.search(rf"layers\.{last}\.self_attn\.", name) is not None
            if (
                subset == "all"
                or (subset == "mlp-final-attn" and (mlp or final_attn))
                or (subset == "mlp-only" and mlp)
                or (subset == "attn-only" and attn)
                or (subset == "mlp-attn" and (mlp or attn))
            ):
                chosen[f"{key}.{name}"] = p
    return chosen


class FewShotObjective:
    """The negated denoising loss on the concept's images, over the subset's text-encoder weights."""

    def __init__(self, model: DiffusionModel, request: EraseRequest, cfg: FewShotConfig) -> None:
        if not request.targets:
            raise ValueError("few-shot erasure needs a concept to erase")
        self.model, self.cfg = model, cfg
        self.generator = torch.Generator("cpu").manual_seed(request.seed)
        latents, owners = [], []
        for k in range(len(request.targets)):
            z = self._latents(request, k)
            latents.append(z)
            owners += [k] * len(z)
        self.latents, self.owners, self.targets = torch.cat(latents), owners, request.targets
        model.requires_grad_(False)
        self.params = trainable_parameters(model, cfg.subset)
        model.master_weights(list(self.params.values()))
        for p in self.params.values():
            p.requires_grad_(True)
        for key, module in model.modules().items():
            if key.startswith("text_encoder"):
                module.train()
        self.order: list[int] = []

    def _latents(self, request: EraseRequest, k: int) -> torch.Tensor:
        model, cfg, concept = self.model, self.cfg, request.targets[k]
        if cfg.zero_shot:  # official: torch.rand latents, one per batch element
            c = model.unet.config
            shape = (cfg.batch_size, c.in_channels, c.sample_size, c.sample_size)
            return torch.rand(shape, generator=self.generator).to(model.device)
        pixels, _ = concept_pixels(request, concept, cfg, model.resolution)
        if cfg.flip:
            flip = torch.rand(len(pixels), generator=self.generator) < 0.5
            pixels = torch.where(flip.view(-1, 1, 1, 1), pixels.flip(-1), pixels)
        return model.latents_of(pixels, self.generator)  # encoded once, as the official dataset does

    def steps(self) -> int:
        return self.cfg.epochs * math.ceil(len(self.latents) / self.cfg.batch_size)

    def optimizer(self) -> torch.optim.Optimizer:
        cfg = self.cfg
        return torch.optim.Adam(
            self.params.values(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay
        )

    def _prompt(self, k: int) -> str:
        concept = self.targets[k]
        if self.cfg.templates == "concept":
            return concept.prompts[int(torch.randint(len(concept.prompts), (1,), generator=self.generator))]
        pool = OBJECT_TEMPLATES if self.cfg.templates == "object" else STYLE_TEMPLATES
        return pool[int(torch.randint(len(pool), (1,), generator=self.generator))].format(concept.name)

    def loss(self, step: int) -> torch.Tensor:
        if len(self.order) < self.cfg.batch_size:  # shuffled epochs, as the official DataLoader
            self.order += torch.randperm(len(self.latents), generator=self.generator).tolist()
        idx, self.order = self.order[: self.cfg.batch_size], self.order[self.cfg.batch_size :]
        cond = self.model.encode([self._prompt(self.owners[i]) for i in idx])
        return -self.model.denoising_loss(self.latents[idx], cond, self.generator)

    def close(self) -> None:
        for key, module in self.model.modules().items():
            if key.startswith("text_encoder"):
                module.eval()
        self.model.requires_grad_(False)


def erase(model: DiffusionModel, request: EraseRequest, cfg: FewShotConfig) -> EraseResult:
    """Erase the request's concepts from the text encoder(s), in place."""
    objective = FewShotObjective(model, request, cfg)
    return run_objective(objective, objective.steps(), request.log)


METHODS.register(
    "fewshot",
    config=FewShotConfig,
    description="few-shot text-encoder erasure (Fuchi & Takagi 2024): gradient ascent on the denoising loss",
)(Method(erase=erase, objective=FewShotObjective))
