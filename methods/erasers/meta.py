"""Meta-unlearning (Gao et al., ICCV 2025, arXiv 2410.12777): erase so that relearning self-destructs.

A wrapper over any eraser. The objective (paper, eq. 4) is gamma1 * L_unlearn(theta) + gamma2 * L_meta(theta),
where the meta term simulates the attacker: theta' = theta after a few fine-tuning steps on the erased
concept's images, and the gradients of the plain denoising loss L_DM *at theta'* are ascended on the
harmful (the concept), related and unrelated sets, so that relearning the concept breaks the model.
Per outer step, as the official esd_meta.py (first-order, FOMAML-style: no gradient through the inner loop):

    g = grad L_unlearn(theta)                                       (the wrapped method's loss; 0 for closed forms)
      + gamma1_1 * grad L_DM(theta; unrelated) + gamma1_2 * grad L_DM(theta; related)
      - gamma2_1 * grad L_DM(theta'; harmful test) - gamma2_2 * grad L_DM(theta'; related)
      - gamma2_3 * grad L_DM(theta'; unrelated)
    theta' = inner_steps AdamW steps of L_DM on the harmful train set from theta (all UNet weights, clip 1)

then one optimizer step on the clipped g. Each set's gradient is summed over its batches, as the official
code does. Optimisation-based methods (ESD, few-shot) contribute their loss and their own optimizer at
every outer step; closed-form ones (UCE, MACE) run first and the meta steps start from their result
(official meta.py), training `trainable` with AdamW.

Defaults: the official script's (lr 1e-5, batch 10, gamma1_1 0.1, gamma1_2 0.01, inner lr = outer lr, one
epoch of the 30 harmful training images = 3 inner steps), with the gamma2 values it appears to intend:
scripts/esd_meta.sh passes `--gamma2_1 0.1 --gamma2_1 0.1 --gamma2_1 0.01`, so as run gamma2_1 = 0.01 and
gamma2_2 = gamma2_3 keep their argparse default 1.0; read in order the three flags say 0.1 / 0.1 / 0.01,
the defaults here. Both readings are presets (`meta-nudity-as-run`, `meta-nudity`), with the official ESD
inside (`esd-meta`: eta 3, the whole UNet, x_t from the student, AdamW) and the official nudity sets
(harmful "nudity", related "woman", unrelated "a lovely dog", 30 + 30 images each; src/gen_images.py).
The sets are images the base model draws from prompt lists, cached, or imagefolders.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from methods.datasets.base import CaptionedImages
from methods.datasets.imagefolder import ImageFolderConfig, image_folder
from methods.erasers.base import METHODS, EraseRequest, EraseResult, Method, concept_images
from methods.models import DiffusionModel
from methods.presets import Preset, Presets

_SETS = {
    "image_steps": 50,
    "image_guidance": 7.5,
    "outer_steps": 1500,
    "lr": 1e-5,
    "batch_size": 10,
    "inner_steps": 3,
    "inner_lr": 1e-5,
    "weight_decay": 1e-4,
    "max_grad_norm": 1.0,
    "method": "esd",
    "method_config": {"preset": "esd-meta"},
    "harmful": {"images_per_prompt": 30},
    "related": {"prompts": ["woman"], "images_per_prompt": 30},
    "unrelated": {"prompts": ["a lovely dog"], "images_per_prompt": 30},
}
_SCRIPT = "sail-sg/Meta-Unlearning scripts/esd_meta.sh, src/esd_meta.py, src/gen_images.py"


class ImageSet(BaseModel):
    """Where one of the meta sets comes from: prompts the base model draws (cached), or a folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompts: list[str] = Field(default_factory=list)  # empty: the default for this set (see MetaConfig)
    folder: str | None = None  # an imagefolder (metadata.jsonl) instead of drawing
    images_per_prompt: int = Field(2, ge=1)

    @field_validator("folder")
    @classmethod
    def _is_dir(cls, v: str | None) -> str | None:
        if v is not None and not (Path(v).expanduser() / "metadata.jsonl").is_file():
            raise ValueError(f"{v}: not an imagefolder (no metadata.jsonl)")
        return v


class MetaConfig(Presets):
    model_config = ConfigDict(frozen=True, extra="forbid")

    PRESETS = {
        "meta-nudity-as-run": Preset(
            {**_SETS, "gamma1_1": 0.1, "gamma1_2": 0.01, "gamma2_1": 0.01, "gamma2_2": 1.0, "gamma2_3": 1.0},
            _SCRIPT,
            note="the gammas the script runs: its three --gamma2_1 flags leave gamma2_2 and gamma2_3 at 1.0",
        ),
        "meta-nudity": Preset(
            {**_SETS, "gamma1_1": 0.1, "gamma1_2": 0.01, "gamma2_1": 0.1, "gamma2_2": 0.1, "gamma2_3": 0.01},
            _SCRIPT,
            note="the gammas the script's flags appear to intend (0.1, 0.1, 0.01 in order)",
        ),
    }

    method: str = "esd"  # the eraser wrapped (any registered method but meta itself)
    method_config: dict[str, Any] = Field(default_factory=dict)  # its config, checked by its own class
    outer_steps: int = Field(1000, ge=1)  # official default 1000 (script 1500)
    lr: float = Field(1e-5, gt=0)  # outer AdamW for closed-form methods (optimisation-based use their own)
    weight_decay: float = Field(1e-4, ge=0)  # AdamW, outer and inner (official)
    trainable: Literal["method", "full", "xattn"] = "method"  # closed forms: method = the weights they edited
    inner_steps: int = Field(3, ge=1)  # simulated relearning steps (official: one epoch, 30 images / batch 10)
    inner_lr: float = Field(1e-5, gt=0)  # official: = outer lr
    batch_size: int = Field(10, ge=1)  # official train_batch_size
    max_grad_norm: float = Field(1.0, gt=0)  # clipping of inner and outer steps (official)
    gamma1_1: float = Field(0.1, ge=0)  # unrelated set at theta (retain what is not the concept)
    gamma1_2: float = Field(0.01, ge=0)  # related set at theta
    gamma2_1: float = Field(0.1, ge=0)  # harmful test set at theta' (relearning must not succeed)
    gamma2_2: float = Field(0.1, ge=0)  # related set at theta' (relearning breaks related concepts)
    gamma2_3: float = Field(0.01, ge=0)  # unrelated set at theta'
    harmful: ImageSet = ImageSet()  # default: the erased concepts' prompts
    related: ImageSet = ImageSet()  # default: none (its gamma terms then contribute nothing)
    unrelated: ImageSet = ImageSet()  # default: the experiment's other concepts' prompts
    image_steps: int = Field(25, ge=1)  # sampling steps for drawn images
    image_guidance: float = Field(7.5, ge=0)
    _inner: Any = PrivateAttr(None)  # the wrapped method's typed config, validated with this one

    @model_validator(mode="after")
    def _inner_method(self) -> MetaConfig:
        # The methods it may wrap are those registered (methods/catalog.py registers them all; the spec imports it).
        if self.method == "meta":
            raise ValueError("method: meta cannot wrap itself")
        if self.method not in METHODS:
            known = ", ".join(n for n in METHODS.names() if n != "meta")
            known = known or "none; import methods.catalog"
            raise ValueError(f"method: unknown method {self.method!r} (registered: {known})")
        entry = METHODS.get(self.method)
        if entry.config is not None:
            try:
                self._inner = entry.config.model_validate(self.method_config)  # typed once, here
            except ValidationError as err:
                e = err.errors()[0]
                where = ".".join(str(x) for x in e["loc"])
                msg = e["msg"].removeprefix("Value error, ")
                named = f"method_config.{where}: {msg}" if where else self._named(msg, "method_config: ")
                raise ValueError(named) from None
        return self

    def inner(self) -> Any:
        """The wrapped method's typed config."""
        return self._inner

    def check_targets(self, targets: list[tuple[str, list[str]]]) -> None:
        """The wrapped method's own check of the concepts it erases, if it has one."""
        check = getattr(self._inner, "check_targets", None)
        if check is not None:
            try:
                check(targets)
            except ValueError as err:
                raise ValueError(self._named(str(err))) from None

    def _named(self, msg: str, otherwise: str = "") -> str:
        """A wrapped config's message naming one of its fields ("guide: ...") names it under method_config;
        any other message gets `otherwise` in front."""
        field, sep, rest = msg.partition(": ")
        if sep and field in METHODS.get(self.method).config.model_fields:
            return f"method_config.{field}: {rest}"
        return otherwise + msg

    def warnings(self) -> list[str]:
        """Settings that run but do nothing the user may think they do."""
        inner = getattr(self._inner, "warnings", None)
        found = [f"method_config: {w}" for w in inner()] if inner is not None else []
        related = [g for g in ("gamma1_2", "gamma2_2") if getattr(self, g)]
        if related and not (self.related.prompts or self.related.folder):
            found.append(
                f"the related set is empty, so {' and '.join(related)} act on nothing: the related concepts "
                "that should break when the erased one is relearned (the method's second half) are off; "
                "give related.prompts (the official nudity recipe uses 'woman') or set them to 0"
            )
        return found


Batches = list[tuple[torch.Tensor, list[str]]]  # (pixels (B, 3, R, R) in [-1, 1], captions)


def _images(request: EraseRequest, source: ImageSet, default: list[str], seed: int, cfg: MetaConfig) -> CaptionedImages:
    if source.folder is not None:
        return image_folder(ImageFolderConfig(path=source.folder), request.data)
    prompts = list(source.prompts) or default
    if not prompts:
        return CaptionedImages(torch.zeros(0, 3, 1, 1), [])
    return concept_images(
        request,
        prompts,
        images_per_prompt=source.images_per_prompt,
        seed=seed,
        steps=cfg.image_steps,
        guidance_scale=cfg.image_guidance,
    )


def _batches(data: CaptionedImages, size: int) -> Batches:
    return [(data.pixels[i : i + size], data.captions[i : i + size]) for i in range(0, len(data), size)]


def set_gradient(
    model: DiffusionModel,
    names: list[str],
    batches: Batches,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """sum over batches of grad L_DM w.r.t. the named parameters of `model` (official `train_step`)."""
    named = model.named_parameters()
    params = [named[n] for n in names]
    total = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for pixels, captions in batches:
        loss = model.denoising_loss(model.latents_of(pixels, generator), model.encode(captions), generator)
        for acc, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
            if g is not None:
                acc += g.float()
    return total


def relearn(model: DiffusionModel, batches: Batches, cfg: MetaConfig, generator: torch.Generator) -> None:
    """The simulated attack, in place: `inner_steps` AdamW steps of L_DM on all UNet weights (official)."""
    params = list(model.unet.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.inner_lr, weight_decay=cfg.weight_decay)
    for step in range(cfg.inner_steps):
        pixels, captions = batches[step % len(batches)]
        loss = model.denoising_loss(model.latents_of(pixels, generator), model.encode(captions), generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()


def meta_gradient(
    model: DiffusionModel,
    names: list[str],
    sets: dict[str, Batches],
    cfg: MetaConfig,
    generator: torch.Generator,
) -> list[torch.Tensor]:
    """Everything but grad L_unlearn in the outer gradient g (module doc), for the named parameters."""
    total = [torch.zeros_like(p, dtype=torch.float32) for p in (model.named_parameters()[n] for n in names)]

    def add(weight: float, grads: list[torch.Tensor]) -> None:
        for acc, g in zip(total, grads, strict=True):
            acc.add_(g, alpha=weight)

    if sets["unrelated"] and cfg.gamma1_1:
        add(cfg.gamma1_1, set_gradient(model, names, sets["unrelated"], generator))
    if sets["related"] and cfg.gamma1_2:
        add(cfg.gamma1_2, set_gradient(model, names, sets["related"], generator))
    relearned = copy.deepcopy(model)  # theta -> theta' on a copy
    relearn(relearned, sets["harmful_train"], cfg, generator)
    for key, gamma in (("harmful_test", cfg.gamma2_1), ("related", cfg.gamma2_2), ("unrelated", cfg.gamma2_3)):
        if sets[key] and gamma:
            add(-gamma, set_gradient(relearned, names, sets[key], generator))
    del relearned
    return total


def _closed_form_params(model: DiffusionModel, cfg: MetaConfig, edited: list[str]) -> dict[str, torch.nn.Parameter]:
    named = model.named_parameters()
    if cfg.trainable == "method" and edited:
        return {n: named[n] for n in edited}
    if cfg.trainable == "xattn":
        return {n: p for n, p in named.items() if n.startswith("unet.") and "attn2" in n}
    return {n: p for n, p in named.items() if n.startswith("unet.")}


def erase(model: DiffusionModel, request: EraseRequest, cfg: MetaConfig) -> EraseResult:
    """Erase with the wrapped method plus the meta term, in place."""
    entry = METHODS.get(cfg.method)
    inner_cfg = cfg.inner()
    generator = torch.Generator("cpu").manual_seed(request.seed)
    harmful_prompts = request.prompts
    keep = [p for c in request.preserve for p in c.prompts]
    half = _images(request, cfg.harmful, harmful_prompts, request.seed, cfg)
    sets = {
        "harmful_train": _batches(half, cfg.batch_size),
        "harmful_test": _batches(
            _images(request, cfg.harmful, harmful_prompts, request.seed + 1000, cfg), cfg.batch_size
        ),
        "related": _batches(_images(request, cfg.related, [], request.seed + 2000, cfg), cfg.batch_size),
        "unrelated": _batches(_images(request, cfg.unrelated, keep, request.seed + 3000, cfg), cfg.batch_size),
    }
    if not sets["harmful_train"]:
        raise ValueError("meta-unlearning needs images of the concept (harmful set)")

    if entry.obj.objective is not None:
        objective = entry.obj.objective(model, request, inner_cfg)
        params, optimizer = objective.params, objective.optimizer()
    else:  # closed form first, then meta steps from its result
        objective = None
        edited = entry.obj.erase(model, request, inner_cfg).trained
        params = _closed_form_params(model, cfg, edited)
        model.master_weights(list(params.values()))
        optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    names = sorted(params)
    ordered = [params[n] for n in names]
    losses: list[float] = []
    try:
        for step in range(cfg.outer_steps):
            optimizer.zero_grad(set_to_none=True)
            for p in ordered:
                p.requires_grad_(True)
            meta = meta_gradient(model, names, sets, cfg, generator)
            if objective is not None:
                loss = objective.loss(step)
                loss.backward()
                losses.append(loss.item())
            for p, g in zip(ordered, meta, strict=True):
                p.grad = g.to(p.dtype) if p.grad is None else p.grad + g.to(p.dtype)
            torch.nn.utils.clip_grad_norm_(ordered, cfg.max_grad_norm)
            optimizer.step()
            if request.log is not None:
                request.log(step, losses[-1] if losses else math.nan)
    finally:
        if objective is not None:
            objective.close()
        model.requires_grad_(False)
        for module in model.modules().values():
            module.eval()
    return EraseResult(trained=names, losses=losses)


METHODS.register(
    "meta",
    config=MetaConfig,
    description="meta-unlearning (Gao 2025) over any method: simulated relearning self-destructs",
)(Method(erase=erase))
