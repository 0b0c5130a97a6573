"""The cheap resurgence signal: the denoising loss on the base model's own images of the erased concept, on
fixed noise, placed between the erased model's loss (0) and the base model's (1)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from methods.evaluation.presence import EvalConfig
from methods.models import DiffusionModel


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


def load_probe(folder: Path, cfg: ProxyConfig) -> tuple[Probe, float]:
    """A probe `save_probe` wrote with `cfg` (the trial's own, already typed), and the base model's loss on it."""
    from safetensors.torch import load_file

    meta = json.loads((folder / "probe.json").read_text())
    latents = load_file(str(folder / "probe.safetensors"))["latents"]
    return Probe(latents, list(meta["prompts"]), cfg), float(meta["loss"])


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
