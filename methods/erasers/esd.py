"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023, arXiv 2303.07345).

The erased model's prediction for the concept c is trained towards the frozen model's prediction steered
*away* from c with negative guidance (paper, eq. 3):

    eps_theta(x_t, c, t)  <-  eps*(x_t, t) - eta * [eps*(x_t, c, t) - eps*(x_t, t)]

with x_t drawn by running the frozen model with guidance from noise for a random number of DDIM steps.
ESD-x trains the cross-attention (`attn2`) layers only (erases the concept from the prompt, for
styles); ESD-u trains everything else (unconditional erasure, for nudity and objects).

Deviations from the official diffusers code (rohitgandikota/erasing, esd_sd.py), each for a reason:
- The target is the paper's. The official diffusers scripts write it as e_p - g (e_p - e_0), i.e. eta = g - 1:
  esd_sd.py's default negative_guidance g = 2 is the paper's eta = 1 (our default); esd_sdxl.py's default
  g = 1 (with start guidance 2 and lr 2e-4) is eta = 0, the target e_0 = eps*(x_t, t), which eta >= 0 allows.
- x_t is drawn by the frozen model, as in the diffusers scripts; the paper-era train-esd.py and the ESD inside
  meta-unlearning's esd_meta.py draw it with the model being trained (`xt_from: student`).
- Sampling is DDIM (the paper-era scheme) for every model; the diffusers scripts use the pipeline's default
  scheduler (PNDM on SD v1.4). esd_sd.py trains at 1024 px even on SD v1.4; here at the model's resolution.
- Randomness (timestep, seed of x_t) comes from one seeded generator, not `random`, so runs repeat.
- Batches are the concept's prompts cycled, not always the bare concept name, so a concept described by
  several prompts is erased under all of them.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import ConfigDict, Field

from methods.erasers.base import METHODS, EraseRequest, EraseResult, Method, run_objective
from methods.models import DiffusionModel
from methods.presets import Preset, Presets

# Which UNet parameters each variant trains. esd-*: Linear / Conv2d modules, as esd_sd.py's
# get_esd_trainable_parameters; noxattn: every parameter but cross-attention, the time embedding and the
# output layers (the paper-era train-esd.py's ESD-u); full: every UNet parameter (esd_meta.py's).
Variant = Literal["esd-x", "esd-u", "esd-all", "esd-x-strict", "noxattn", "full"]

_COMMON = {"eta": 1.0, "start_guidance": 3.0, "sample_steps": 50, "batch_size": 1, "weight_decay": 0.0}


class ESDConfig(Presets):
    model_config = ConfigDict(frozen=True, extra="forbid")

    PRESETS = {
        "esd-x": Preset(
            {**_COMMON, "variant": "esd-x", "iterations": 200, "lr": 5e-5, "xt_from": "frozen"},
            "rohitgandikota/erasing esd_sd.py (--train_method esd-x, negative_guidance 2)",
        ),
        "esd-u": Preset(
            {**_COMMON, "variant": "esd-u", "iterations": 200, "lr": 5e-5, "xt_from": "frozen"},
            "rohitgandikota/erasing esd_sd.py (--train_method esd-u, negative_guidance 2)",
        ),
        "esd-x-paper": Preset(
            {**_COMMON, "variant": "esd-x", "iterations": 1000, "lr": 1e-5, "xt_from": "student"},
            "rohitgandikota/erasing train-scripts/train-esd.py at a2189e9 (train_method xattn)",
        ),
        "esd-u-paper": Preset(
            {**_COMMON, "variant": "noxattn", "iterations": 1000, "lr": 1e-5, "xt_from": "student"},
            "rohitgandikota/erasing train-scripts/train-esd.py at a2189e9 (train_method noxattn)",
        ),
        "esd-sdxl": Preset(
            {
                **_COMMON,
                "variant": "esd-x",
                "iterations": 200,
                "lr": 2e-4,
                "eta": 0.0,
                "start_guidance": 2.0,
                "xt_from": "frozen",
            },
            "rohitgandikota/erasing esd_sdxl.py (negative_guidance 1, guidance 2)",
            note="the script's main block runs twice; the second pass (lr 2e-4) writes the saved weights",
        ),
        "esd-meta": Preset(
            {
                **_COMMON,
                "variant": "full",
                "iterations": 1000,
                "lr": 1e-5,
                "eta": 3.0,
                "xt_from": "student",
                "weight_decay": 1e-4,
            },
            "sail-sg/Meta-Unlearning src/esd_meta.py (concept_scale 3, full, AdamW)",
            note="the ESD loss inside meta-unlearning; its outer loop is the meta preset's",
        ),
    }

    variant: Variant = "esd-x"  # esd-x: cross-attention only; esd-u: all but cross-attention
    iterations: int = Field(200, ge=1)  # optimizer steps; official diffusers default 200 (paper: 1000)
    lr: float = Field(5e-5, gt=0, le=1)  # Adam learning rate; official diffusers default
    eta: float = Field(1.0, ge=0)  # negative guidance of the paper's eq. 3 (official flag g: eta = g - 1;
    # esd_sd.py's g 2 is eta 1, esd_sdxl.py's g 1 is eta 0: the target is then the unconditional prediction)
    sample_steps: int = Field(50, ge=2)  # DDIM steps of the partial sampling that produces x_t
    start_guidance: float = Field(3.0, ge=0)  # CFG scale of that sampling (official default 3)
    batch_size: int = Field(1, ge=1)  # prompts per optimizer step (official: 1)
    xt_from: Literal["frozen", "student"] = "frozen"  # which model draws x_t (diffusers scripts: frozen)
    weight_decay: float = Field(0.0, ge=0)  # AdamW's decoupled decay (0: Adam, the ESD scripts'; meta's 1e-4)


def trainable_parameters(unet: torch.nn.Module, variant: Variant) -> dict[str, torch.nn.Parameter]:
    """The parameters a variant trains, by parameter name, as in the official code (see `Variant`)."""
    if variant == "full":
        return dict(unet.named_parameters())
    if variant == "noxattn":  # train-esd.py skips out.* (conv_norm_out, conv_out), attn2 and time_embed
        skip = ("conv_out.", "conv_norm_out.")
        return {
            n: p
            for n, p in unet.named_parameters()
            if not n.startswith(skip) and "attn2" not in n and "time_embedding" not in n
        }
    chosen: dict[str, torch.nn.Parameter] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        xattn = "attn2" in name
        if (
            variant == "esd-all"
            or (variant == "esd-x" and xattn)
            or (variant == "esd-u" and not xattn)
            or (variant == "esd-x-strict" and ("attn2.to_k" in name or "attn2.to_v" in name))
        ):
            for pname, p in module.named_parameters(recurse=False):
                chosen[f"{name}.{pname}"] = p
    return chosen


class ESDObjective:
    """ESD's loss (eq. 3) at each step, over the variant's UNet parameters (see `erase`)."""

    def __init__(self, model: DiffusionModel, request: EraseRequest, cfg: ESDConfig) -> None:
        if not request.prompts:
            raise ValueError("ESD needs at least one prompt of the concept to erase")
        self.model, self.cfg, self.prompts = model, cfg, request.prompts
        self.frozen = copy.deepcopy(model.unet).requires_grad_(False).eval()  # eps*: the original (2nd copy)
        chosen = trainable_parameters(model.unet, cfg.variant)
        self.params = {f"unet.{n}": p for n, p in chosen.items()}
        model.master_weights(list(self.params.values()))
        for p in self.params.values():
            p.requires_grad_(True)
        self.generator = torch.Generator("cpu").manual_seed(request.seed)
        with torch.no_grad():
            self.null = model.unconditional(cfg.batch_size)
        model.unet.train()

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.params.values(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def loss(self, step: int) -> torch.Tensor:
        cfg, model = self.cfg, self.model
        batch = [self.prompts[(step * cfg.batch_size + i) % len(self.prompts)] for i in range(cfg.batch_size)]
        stop_at = int(torch.randint(0, cfg.sample_steps - 1, (1,), generator=self.generator))
        seeds = torch.randint(0, 2**31 - 1, (cfg.batch_size,), generator=self.generator).tolist()
        with torch.no_grad():
            cond = model.encode(batch)
            x_t, t = model.sample(
                cond,
                self.null,
                model.noise(seeds),
                steps=cfg.sample_steps,
                stop_at=stop_at,
                guidance_scale=cfg.start_guidance,
                unet=self.frozen if cfg.xt_from == "frozen" else model.unet,
            )
            e_0 = model.eps(x_t, t, self.null, self.frozen)  # eps*(x_t, t)
            e_p = model.eps(x_t, t, cond, self.frozen)  # eps*(x_t, c, t)
            target = e_0 - cfg.eta * (e_p - e_0)
        e_n = model.eps(x_t, t, cond)  # eps_theta(x_t, c, t)
        return torch.nn.functional.mse_loss(e_n, target)

    def close(self) -> None:
        self.model.unet.eval()
        self.model.unet.requires_grad_(False)
        self.frozen = None


def erase(model: DiffusionModel, request: EraseRequest, cfg: ESDConfig) -> EraseResult:
    """Erase the concepts of `request` (all their prompts, cycled) from `model.unet` in place (eq. 3)."""
    return run_objective(ESDObjective(model, request, cfg), cfg.iterations, request.log)


METHODS.register(
    "esd", config=ESDConfig, description="ESD (Gandikota 2023): negative-guidance fine-tuning, ESD-x / ESD-u"
)(Method(erase=erase, objective=ESDObjective))
