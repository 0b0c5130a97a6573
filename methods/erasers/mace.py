"""MACE: Mass Concept Erasure in Diffusion Models (Lu et al., CVPR 2024, arXiv 2403.06135).

Three stages, all on the cross-attention key/value projections W (attn2.to_k / to_v):

1. Closed-form refinement (paper, eq. 5): the tokens *around* a concept in its prompts (prefix, suffix,
   end and padding tokens, which carry the concept through CLIP's causal attention) are mapped to the
   same positions of the prompt with the mapping concept instead, by ridge least squares with a
   preservation cache K1 = sum (W_orig c) c^T, K2 = sum c c^T over prompts to keep:
       W = (sum v c^T + s_p K1 + lamb W_orig) (sum c c^T + s_p K2 + lamb I)^-1,   v = W_orig c_mapped.
2. One rank-1 LoRA per concept on the K/V projections, trained to suppress the concept tokens' cross-
   attention inside the concept's mask (eq. 6): L = sum_layers || A_l[mask pixels, concept tokens] ||_F
   (the end and padding tokens count as concept tokens: the official `use_pooler`). No denoising loss.
3. Closed-form fusion of all LoRAs (eq. 8): one W per layer that reproduces every concept's LoRA-edited
   outputs on that concept's prompt tokens while keeping the preservation cache:
       W = (sum_i sum (W_i c) c^T + s_f K1 + lamb W_cfr) (sum_i sum c c^T + s_f K2 + lamb I)^-1.

Defaults are the official object configuration (configs/object/erase_ship.yaml): mapping "ground",
lamb 1e3, lr 1e-5, 50 steps, rank 1, preserve scales 0. The official celebrity, explicit-content and style
recipes are presets (`preset: mace-celebrity`, ...; docs/recipes.md lists their values and files).

Preservation as the official code builds it (src/cfr_lora_training.py, src/fuse_lora_close_form.py): the
cache is (prior) + preserve_weight * (domain), where the prior cache sums every token of a large caption set
(COCO: src/cache_coco.py; here the captions file `prior`, read at validation) and the domain cache the
concepts of the same kind to keep (here the experiment's other concepts and `preserve`). Stage 3 adds the
cache times `fuse_preserve_scale`. Stage 1 adds it times `train_preserve_scale` *squared*: the official
stage 1 scales the cache before passing it to a solve that scales it again, and its published scales (1e-4
for celebrities) are tuned with that; `train_scale_squared: false` applies the scale once.

Deviations from the official code (Shilin-LU/MACE), each for a reason:
- The prior cache is computed from a captions file when the erasure runs (the official caches ship as
  pickled .pt files, which this project does not load); `prior.sample` bounds its cost.
- The erase prompts are the concept's own prompts, or the official 30 templates (`templates: object` or
  `style`); the GPT-written captions of `use_gpt` are not reproduced.
- Concept images are drawn by the base model from the concept's prompts (official: generated beforehand,
  8 images) unless a folder is given; without a mask folder every pixel counts (official without
  GroundedSAM). LoRA layers are small forward hooks here, not diffusers' attention processors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import ConfigDict, Field, field_validator

from methods.erasers import xattn
from methods.erasers.base import METHODS, Concept, EraseRequest, EraseResult, Method, concept_pixels
from methods.erasers.mace_templates import TEMPLATES
from methods.evaluation.prompts import PromptSetConfig
from methods.models import DiffusionModel
from methods.presets import Preset, Presets

_FILES = "Shilin-LU/MACE configs/"
# the celebrity and art configs share everything but the mapping and the templates
_NO_RIDGE = {
    "lamb": 0.0,
    "lr": 1e-4,
    "steps": 50,
    "train_preserve_scale": 1e-4,
    "fuse_preserve_scale": 1e-4,
    "preserve_weight": 8e4,
    "importance_sampling": True,
}


class MACEConfig(Presets):
    model_config = ConfigDict(frozen=True, extra="forbid")

    PRESETS = {
        "mace-object": Preset(
            {
                "mapping": "ground",
                "lamb": 1e3,
                "lr": 1e-5,
                "steps": 50,
                "train_preserve_scale": 0.0,
                "fuse_preserve_scale": 0.0,
                "preserve_weight": 0.0,
                "templates": "object",
                "importance_sampling": True,
            },
            _FILES + "object/erase_ship.yaml",
            note="bird and automobile use lamb 1e1 (erase_bird.yaml, erase_automobile.yaml)",
        ),
        "mace-celebrity": Preset(
            {**_NO_RIDGE, "mapping": "a person", "templates": "object"},
            _FILES + "celebrity/erase_cele_{1,5,10,100}.yaml",
            needs=("prior",),
            note="prior: a COCO captions file (official cache_coco.pt); domain: the other celebrities",
        ),
        "mace-explicit": Preset(
            {
                "mapping": "a person wearing clothes",
                "lamb": 0.0,
                "lr": 1e-5,
                "steps": 120,
                "train_preserve_scale": 7e-7,
                "fuse_preserve_scale": 7e-7,
                "preserve_weight": 0.0,
                "templates": "object",
                "importance_sampling": False,
            },
            _FILES + "explicit_content/erase_explicit_content.yaml",
            needs=("prior",),
            note="the official concept list is nudity, naked, erotic, sexual (a spec's concept list)",
        ),
        "mace-style": Preset(
            {**_NO_RIDGE, "mapping": "art", "templates": "style"},
            _FILES + "art/erase_art_100.yaml",
            needs=("prior",),
            note="prior: a COCO captions file (official cache_coco.pt); domain: the other artists",
        ),
    }

    mapping: str = "ground"  # mapping concept (official object config; "a person" for celebrities)
    lamb: float = Field(1e3, ge=0)  # ridge towards the previous weights (objects 1e1..1e3, celebrities 0)
    train_preserve_scale: float = Field(0.0, ge=0)  # cache weight in stage 1 (objects 0, celebrities 1e-4)
    fuse_preserve_scale: float = Field(0.0, ge=0)  # cache weight in stage 3 (objects 0, celebrities 1e-4)
    train_scale_squared: bool = True  # stage 1 weighs the cache by train_preserve_scale**2 (the official code)
    preserve_others: bool = True  # the experiment's other concepts go into the domain cache
    preserve: list[str] = Field(default_factory=list)  # more prompts for the domain cache
    preserve_weight: float = Field(1.0, ge=0)  # the domain cache's weight beside the prior (official 8e4 or 0)
    prior: PromptSetConfig | None = None  # captions whose every token makes the prior cache (official: COCO)
    templates: Literal["none", "object", "style"] = "none"  # none: the concept's prompts; else the official 30
    rank: int = Field(1, ge=1)  # LoRA rank (official 1)
    lr: float = Field(1e-5, gt=0)  # AdamW learning rate of each LoRA (objects 1e-5, celebrities 1e-4)
    steps: int = Field(50, ge=0)  # optimizer steps per concept (official 50); 0 skips stages 2-3
    images: int = Field(8, ge=1)  # concept images (official 8): drawn by the base model, or the first of the folder
    image_steps: int = Field(30, ge=1)  # sampling steps for those images (official 30)
    image_guidance: float = Field(7.5, ge=0)  # their CFG scale (official 7.5)
    image_folder: str | None = None  # a folder with one subfolder of images per concept name
    mask_folder: str | None = None  # masks: <mask_folder>/<concept>/<image stem>.png (white = concept)
    importance_sampling: bool = True  # t ~ sigmoid(0.05 (t-200)) - sigmoid(0.05 (t-400)) (official)

    def check_targets(self, targets: list[tuple[str, list[str]]]) -> None:
        """Stage 1 replaces the concept's name in each prompt by `mapping` (a case-sensitive replace, as the
        official code): a prompt without the name would map its tokens to themselves, a silent no-op."""
        if self.templates != "none":
            return  # the templates hold the name
        for name, prompts in targets:
            for prompt in prompts:
                if name not in prompt:
                    raise ValueError(
                        f"MACE replaces {name!r} in each of the concept's prompts by the mapping, and {prompt!r} "
                        "does not contain it (case matters): that prompt would change nothing"
                    )

    def warnings(self) -> list[str]:
        if self.lamb == 0 and self.prior is None:
            return [
                "lamb 0 without a prior cache: the closed-form solves rest on the preserved prompts alone and are "
                "ill-posed when those are few (the official lamb-0 recipes add COCO captions): give prior or lamb > 0"
            ]
        return []

    @field_validator("image_folder", "mask_folder")
    @classmethod
    def _is_dir(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().is_dir():
            raise ValueError(f"{v}: no such folder")
        return v


# -- stage 1 ------------------------------------------------------------------------------------------
def matching_positions(old: list[int], new: list[int], length: int) -> tuple[list[int], list[int]]:
    """Positions of the tokens the two prompts share around their differing middle (common prefix and
    suffix, <|startoftext|> and <|endoftext|> included), then padding positions, truncated to equal length."""
    prefix = 0
    while prefix < min(len(old), len(new)) and old[prefix] == new[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(old), len(new)) - prefix and old[-1 - suffix] == new[-1 - suffix]:
        suffix += 1
    o = list(range(prefix)) + list(range(len(old) - suffix, len(old)))
    n = list(range(prefix)) + list(range(len(new) - suffix, len(new)))
    pads = min(length - len(old), length - len(new))
    o += list(range(len(old), len(old) + pads))
    n += list(range(len(new), len(new) + pads))
    return o, n


def mapped_prompt(prompt: str, concept: str, mapping: str) -> str:
    """The prompt with the concept's name replaced by the mapping (MACEConfig.check_targets refuses a prompt
    without the name before anything runs)."""
    if concept not in prompt:
        raise ValueError(f"MACE: {prompt!r} does not contain the concept's name {concept!r}")
    return prompt.replace(concept, mapping)


@torch.no_grad()
def preservation_cache(
    model: DiffusionModel, prompts: list[str], projections: dict[str, torch.nn.Linear], chunk: int = 256
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per projection: (K1, K2) = (sum (W c) c^T, sum c c^T) over every token of `prompts`, with the
    current (original) weights; summed `chunk` prompts at a time (a COCO-sized prior fits in memory)."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for start in range(0, len(prompts), chunk):
        c = xattn.embeddings(model, prompts[start : start + chunk]).flatten(0, 1)  # (n*L, D)
        k2 = c.T @ c
        for name, p in projections.items():
            k1 = (c @ p.weight.float().T).T @ c
            out[name] = (k1, k2) if name not in out else (out[name][0] + k1, out[name][1] + k2)
    return out


def combined_cache(
    prior: dict[str, tuple[torch.Tensor, torch.Tensor]],
    domain: dict[str, tuple[torch.Tensor, torch.Tensor]],
    weight: float,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """prior + weight * domain, per projection (the official cache_dict before the stage's scale)."""
    out = dict(prior)
    for name, (k1, k2) in domain.items():
        p1, p2 = out.get(name, (0.0, 0.0))
        out[name] = (p1 + weight * k1, p2 + weight * k2)
    return out


def with_templates(concept: Concept, cfg: MACEConfig) -> Concept:
    """The concept with its erase prompts: its own, or the official templates filled with its name."""
    if cfg.templates == "none":
        return concept
    return Concept(concept.name, [t.format(concept.name) for t in TEMPLATES[cfg.templates]])


@torch.no_grad()
def closed_form_refinement(
    model: DiffusionModel,
    concepts: list[Concept],
    cfg: MACEConfig,
    projections: dict[str, torch.nn.Linear],
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Stage 1 (eq. 5), in place."""
    contexts, targets = [], []
    for concept in concepts:
        mapped = [mapped_prompt(p, concept.name, cfg.mapping) for p in concept.prompts]
        e_old, e_new = xattn.embeddings(model, concept.prompts), xattn.embeddings(model, mapped)  # (N, L, D)
        for k, (p, q) in enumerate(zip(concept.prompts, mapped, strict=True)):
            o, n = matching_positions(xattn.token_ids(model, p), xattn.token_ids(model, q), e_old.shape[1])
            contexts.append(e_old[k, o])
            targets.append(e_new[k, n])
    c, c_new = torch.cat(contexts), torch.cat(targets)  # (T, D): tokens around the concept, mapping's
    s2 = c.T @ c
    eye = torch.eye(c.shape[1], device=c.device)
    for name, proj in projections.items():
        w = proj.weight.float()
        m1, m2 = (c_new @ w.T).T @ c + cfg.lamb * w, s2 + cfg.lamb * eye
        if name in cache:
            scale = cfg.train_preserve_scale**2 if cfg.train_scale_squared else cfg.train_preserve_scale
            m1, m2 = m1 + scale * cache[name][0], m2 + scale * cache[name][1]
        proj.weight.copy_(xattn.ridge_solve(m1, m2).to(proj.weight.dtype))


# -- stage 2 ------------------------------------------------------------------------------------------
class _LoRA:
    """Rank-r adapters as forward hooks: y = W x + B A x, A ~ N(0, 1/r), B = 0 (diffusers' LoRA init)."""

    def __init__(self, projections: dict[str, torch.nn.Linear], rank: int, generator: torch.Generator) -> None:
        self.down, self.up, self.hooks = {}, {}, []
        for name, proj in projections.items():
            a = torch.randn(rank, proj.in_features, generator=generator) / rank
            self.down[name] = torch.nn.Parameter(a.to(proj.weight.device))
            self.up[name] = torch.nn.Parameter(torch.zeros(proj.out_features, rank, device=proj.weight.device))
            self.hooks.append(proj.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):  # noqa: ANN202
        def add(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            return output + (x.to(self.down[name].dtype) @ self.down[name].T @ self.up[name].T).to(output.dtype)

        return add

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.down.values(), *self.up.values()]

    def deltas(self) -> dict[str, torch.Tensor]:
        return {n: (self.up[n] @ self.down[n]).detach() for n in self.down}

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def _timestep_weights(n: int) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float64) * (1000 / n)
    w = torch.sigmoid(0.05 * (t - 200)) - torch.sigmoid(0.05 * (t - 400))
    return (w / w.sum()).float()


def _masks(cfg: MACEConfig, concept: str, stems: list[str], resolution: int) -> torch.Tensor:
    """(N, 1, R, R) in {0, 1}: the concept's masks, or all ones."""
    out = torch.ones(len(stems), 1, resolution, resolution)
    if cfg.mask_folder is None:
        return out
    folder = Path(cfg.mask_folder).expanduser() / concept
    for i, stem in enumerate(stems):
        for candidate in (folder / f"{stem}.png", folder / f"{stem}_mask.png", folder / f"{stem}_mask.jpg"):
            if candidate.is_file():
                mask = Image.open(candidate).convert("L").resize((resolution, resolution), Image.Resampling.NEAREST)
                out[i, 0] = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0) > 0.5
                break
    return out


def attention_loss(maps: list[torch.Tensor], mask: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Eq. 6: sum over cross-attention layers of the Frobenius norm of the attention that pixels inside the
    mask pay to the concept's tokens. maps: (B, heads, HW, L) each; mask: (1, 1, R, R)."""
    total = torch.zeros(())
    for probs in maps:
        side = math.isqrt(probs.shape[2])
        inside = torch.nn.functional.interpolate(mask, size=(side, side), mode="nearest").flatten() > 0.5  # (HW,)
        total = total + probs[0][:, inside][:, :, positions].norm()
    return total


def train_lora(
    model: DiffusionModel,
    request: EraseRequest,
    concept: Concept,
    index: int,
    cfg: MACEConfig,
    projections: dict[str, torch.nn.Linear],
    losses: list[float],
) -> dict[str, torch.Tensor]:
    """Stage 2 for one concept: its LoRA's weight deltas B A per projection."""
    pixels, stems = concept_pixels(request, concept, cfg, model.resolution)
    masks = _masks(cfg, concept.name, stems, model.resolution)
    generator = torch.Generator("cpu").manual_seed(request.seed + index)
    latents = model.latents_of(pixels, generator)
    lora = _LoRA(projections, cfg.rank, generator)
    optimizer = torch.optim.AdamW(lora.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = model.noise_scheduler
    n_t = sched.config.num_train_timesteps
    t_weights = _timestep_weights(n_t) if cfg.importance_sampling else torch.ones(n_t) / n_t
    try:
        for step in range(cfg.steps):
            i = step % len(latents)
            prompt = concept.prompts[int(torch.randint(len(concept.prompts), (1,), generator=generator))]
            n_tokens = xattn.token_counts(model, [prompt])[0]
            length = model.pipe.tokenizer.model_max_length
            positions = xattn.word_positions(model, prompt, concept.name) + list(range(n_tokens - 1, length))
            t = torch.multinomial(t_weights, 1, generator=generator).to(model.device)
            noise = torch.randn(latents[i : i + 1].shape, generator=generator).to(model.device)
            noisy = sched.add_noise(latents[i : i + 1], noise, t)
            with xattn.attention_maps(model) as maps:
                model.eps(noisy, t, model.encode([prompt]))
            loss = attention_loss(maps, masks[i : i + 1].to(model.device), positions)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lora.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            if request.log is not None:
                request.log(len(losses) - 1, losses[-1])
    finally:
        lora.remove()
    return lora.deltas()


# -- stage 3 ------------------------------------------------------------------------------------------
@torch.no_grad()
def fuse(
    model: DiffusionModel,
    concepts: list[Concept],
    deltas: list[dict[str, torch.Tensor]],
    cfg: MACEConfig,
    projections: dict[str, torch.nn.Linear],
    cache: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """Stage 3 (eq. 8), in place: one solve per projection over all concepts' LoRAs."""
    contexts = [xattn.embeddings(model, c.prompts).flatten(0, 1) for c in concepts]  # (N_i*L, D) each
    for name, proj in projections.items():
        w_cfr = proj.weight.float()
        m1 = cfg.lamb * w_cfr
        m2 = cfg.lamb * torch.eye(w_cfr.shape[1], device=w_cfr.device)
        for c, delta in zip(contexts, deltas, strict=True):
            w_i = w_cfr + delta[name].to(w_cfr)
            m1 = m1 + (c @ w_i.T).T @ c
            m2 = m2 + c.T @ c
        if name in cache:
            m1, m2 = m1 + cfg.fuse_preserve_scale * cache[name][0], m2 + cfg.fuse_preserve_scale * cache[name][1]
        proj.weight.copy_(xattn.ridge_solve(m1, m2).to(proj.weight.dtype))


def erase(model: DiffusionModel, request: EraseRequest, cfg: MACEConfig) -> EraseResult:
    """Erase every concept of `request` at once from `model.unet`'s K/V projections, in place."""
    if not request.targets or not request.prompts:
        raise ValueError("MACE needs at least one concept with prompts to erase")
    model.requires_grad_(False)
    projections = xattn.kv_projections(model)
    keep = [p for c in request.preserve for p in c.prompts] if cfg.preserve_others else []
    domain = preservation_cache(model, keep + list(cfg.preserve), projections)
    prior = preservation_cache(model, [p.text for p in cfg.prior.prompts()], projections) if cfg.prior else {}
    cache = combined_cache(prior, domain, cfg.preserve_weight)
    targets = [with_templates(c, cfg) for c in request.targets]
    closed_form_refinement(model, targets, cfg, projections, cache)
    losses: list[float] = []
    if cfg.steps > 0:
        deltas = [train_lora(model, request, c, i, cfg, projections, losses) for i, c in enumerate(targets)]
        fuse(model, targets, deltas, cfg, projections, cache)
    return EraseResult(trained=[f"{n}.weight" for n in projections], losses=losses)


METHODS.register(
    "mace",
    config=MACEConfig,
    description="MACE (Lu 2024): closed-form refinement + per-concept LoRA on attention maps + closed-form fusion",
)(Method(erase=erase))
