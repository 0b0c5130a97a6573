"""Fine-tuning ("relearning") of a text-to-image model on captioned images with the denoising loss.

This is the attack of the concept-resurgence paper (Suriyakumar et al., arXiv 2410.08074): plain
fine-tuning of the erased model, here on data the user chooses (unrelated data for benign resurgence,
images of the concept for a malicious relearning attack). Loss: DDPM's E ||eps - eps_theta(z_t, t, c)||^2.

Trainable subsets: the full UNet, its cross-attention layers only (`attn2`), LoRA adapters on the UNet's
attention projections (peft; base weights stay untouched), or the text encoder(s).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from peft import LoraConfig
from pydantic import BaseModel, ConfigDict, Field

from methods.datasets import CaptionedImages
from methods.models import DiffusionModel

Trainable = Literal["full", "xattn", "lora", "text_encoder"]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # every attention projection of the UNet


class FinetuneConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    trainable: Trainable = "full"  # which weights move (the literature compares full and LoRA)
    lora_rank: int = Field(4, ge=1, le=256)  # LoRA rank r (lora_alpha = r), used when trainable=lora
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-5, gt=0, le=1)  # literature range 1e-6 .. 1e-4
    steps: int = Field(100, ge=1)  # optimizer steps (literature: 5 .. 300)
    batch_size: int = Field(2, ge=1)
    weight_decay: float = Field(1e-2, ge=0)  # AdamW only (torch's default)
    max_grad_norm: float | None = Field(1.0, gt=0)  # gradient clipping; null turns it off
    seed: int = 0  # data order, noise and timesteps


@dataclass(frozen=True)
class FinetuneResult:
    trained: list[str]  # names of the parameters that had gradients
    losses: list[float]  # one per optimizer step


def select_trainable(model: DiffusionModel, cfg: FinetuneConfig) -> dict[str, torch.nn.Parameter]:
    """Switch on gradients for the configured subset (adding LoRA adapters if asked) and return it."""
    model.requires_grad_(False)
    if cfg.trainable == "lora" and not getattr(model.unet, "peft_config", None):  # a later round reuses it
        model.unet.add_adapter(
            LoraConfig(
                r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS
            )
        )
        chosen = {f"unet.{n}": p for n, p in model.unet.named_parameters() if "lora_" in n}
    elif cfg.trainable == "text_encoder":
        chosen = {
            f"{key}.{n}": p
            for key, enc in model.modules().items()
            if key.startswith("text_encoder")
            for n, p in enc.named_parameters()
        }
    else:
        chosen = {f"unet.{n}": p for n, p in model.unet.named_parameters() if cfg.trainable == "full" or "attn2" in n}
    for p in chosen.values():
        p.requires_grad_(True)
    return chosen


def _optimizer(params: list[torch.nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9)


def finetune(
    model: DiffusionModel,
    data: CaptionedImages,
    cfg: FinetuneConfig,
    *,
    every: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `model` in place for `cfg.steps` steps. `callback(step, loss)` runs after every `every`
    steps and after the last one (the trial evaluates there); step counts from 1."""
    if len(data) == 0:
        raise ValueError("the fine-tuning dataset is empty")
    generator = torch.Generator("cpu").manual_seed(cfg.seed)
    latents = model.latents_of(data.pixels, generator)  # (N, 4, h, w): the VAE is frozen, encode once
    params = select_trainable(model, cfg)
    model.master_weights(list(params.values()))
    optimizer = _optimizer(list(params.values()), cfg)
    for module in model.modules().values():
        module.train()
    losses: list[float] = []
    order = torch.randperm(len(data), generator=generator)
    cursor = 0
    for step in range(1, cfg.steps + 1):
        idx = []
        for _ in range(cfg.batch_size):  # walk through shuffled epochs
            if cursor == len(order):
                order, cursor = torch.randperm(len(data), generator=generator), 0
            idx.append(int(order[cursor]))
            cursor += 1
        cond = model.encode([data.captions[i] for i in idx])
        loss = model.denoising_loss(latents[idx], cond, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
        optimizer.step()
        losses.append(loss.item())
        if callback is not None and ((every and step % every == 0) or step == cfg.steps):
            for module in model.modules().values():
                module.eval()
            callback(step, losses[-1])
            for module in model.modules().values():
                module.train()
    for module in model.modules().values():
        module.eval()
    model.requires_grad_(False)
    return FinetuneResult(trained=sorted(params), losses=losses)
