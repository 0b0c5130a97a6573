"""UCE: Unified Concept Editing in Diffusion Models (Gandikota et al., WACV 2024, arXiv 2308.14761).

A closed-form edit of every cross-attention key and value projection W (paper, eq. 7): with c_i the
erased concept's token embeddings, v*_i = W_old c_guide their targets, and c_j the preserved embeddings,

    W = (lamb W_old + a sum_i v*_i c_i^T + b sum_j (W_old c_j) c_j^T)
        (lamb I + a sum_i c_i c_i^T + b sum_j c_j c_j^T)^-1

with a = erase_scale, b = preserve_scale. Each of the 32 (SD v1.4) or 140 (SDXL) matrices is solved alone.

Which tokens (the official code has two versions, both available):
- `last` (default; rohitgandikota/unified-concept-editing, trainscripts/uce_sd_erase.py): one token per
  prompt, its last sub-word; the guide likewise (guide "" gives the <|startoftext|> token).
- `all` (the paper-era train-scripts/train_erase.py): from the last sub-word on, every token (it, the
  end token and the padding, which carry the concept through CLIP's causal attention), aligned position by
  position with the guide's; preserved prompts contribute all their tokens.

Deviations: every prompt of the concept is an erase input (the official code takes the bare names, or the
names in five templates); the experiment's other concepts are preserved by default (`preserve_others`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from methods.erasers import xattn
from methods.erasers.base import METHODS, EraseRequest, EraseResult, Method
from methods.models import DiffusionModel


class UCEConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    guide: str = ""  # the concept erased ones are mapped to (official: "" for objects, "art" for styles)
    erase_scale: float = Field(1.0, gt=0)  # a in eq. 7 (official default 1)
    preserve_scale: float = Field(1.0, ge=0)  # b in eq. 7 (official default 1)
    lamb: float = Field(0.5, ge=0)  # ridge towards W_old (official 0.5)
    tokens: Literal["last", "all"] = "last"  # which token embeddings enter the sums (see the module doc)
    with_to_k: bool = True  # edit the key projections too, not only the values (official: both)
    preserve_others: bool = True  # preserve the experiment's other concepts' prompts
    preserve: list[str] = Field(default_factory=list)  # more prompts to preserve

    def check_targets(self, targets: list[tuple[str, list[str]]]) -> None:
        """Refuse guides that would make the edit a silent no-op or not what was written: one that is only
        blanks (it tokenizes to nothing, i.e. the "" guide: write "" if that is meant), and one that names the
        erased concept (its tokens would be mapped onto themselves)."""
        if self.guide and not self.guide.strip():
            raise ValueError(
                f'guide: {self.guide!r} tokenizes to nothing (the start token, as guide ""): write "" if meant'
            )
        for name, _ in targets:
            if self.guide.strip() and name.lower() in self.guide.lower():
                raise ValueError(
                    f"guide: {self.guide!r} names the erased concept {name!r}: its tokens would map onto themselves"
                )


def _pairs(model: DiffusionModel, prompts: list[str], guide: str, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Erase inputs c (T, D) and the guide inputs they map to (T, D), token by token."""
    e_old, e_guide = xattn.embeddings(model, prompts), xattn.embeddings(model, [guide])[0]  # (N, L, D), (L, D)
    n_guide = xattn.token_counts(model, [guide])[0]
    i_n = n_guide - 2  # last sub-word of the guide (0, <|startoftext|>, for "")
    length = e_old.shape[1]
    olds, news = [], []
    for emb, n in zip(e_old, xattn.token_counts(model, prompts), strict=True):
        i_o = n - 2  # last sub-word of the prompt
        if mode == "last":
            olds.append(emb[i_o : i_o + 1])
            news.append(e_guide[i_n : i_n + 1])
        else:
            far = max(i_o, i_n)
            olds.append(emb[i_o : length - (far - i_o)])
            news.append(e_guide[i_n : length - (far - i_n)])
    return torch.cat(olds), torch.cat(news)


def _preserved(model: DiffusionModel, prompts: list[str], mode: str) -> torch.Tensor:
    if not prompts:
        return torch.zeros(0, xattn.embeddings(model, [""]).shape[-1])
    emb = xattn.embeddings(model, prompts)
    if mode == "all":
        return emb.reshape(-1, emb.shape[-1])
    return torch.stack([e[n - 2] for e, n in zip(emb, xattn.token_counts(model, prompts), strict=True)])


@torch.no_grad()
def erase(model: DiffusionModel, request: EraseRequest, cfg: UCEConfig) -> EraseResult:
    """Edit the K/V projections of `model.unet` in place (eq. 7)."""
    if not request.prompts:
        raise ValueError("UCE needs at least one prompt of the concept to erase")
    c_e, c_g = _pairs(model, request.prompts, cfg.guide, cfg.tokens)  # (T, D) each
    keep = [p for c in request.preserve for p in c.prompts] if cfg.preserve_others else []
    c_p = _preserved(model, keep + list(cfg.preserve), cfg.tokens).to(c_e)  # (P, D)
    eye = torch.eye(c_e.shape[1], device=c_e.device)
    m2 = cfg.lamb * eye + cfg.erase_scale * c_e.T @ c_e + cfg.preserve_scale * c_p.T @ c_p  # (D, D)
    trained = []
    for name, proj in xattn.kv_projections(model, cfg.with_to_k).items():
        w_old = proj.weight.float()  # (d_out, D)
        v_star = c_g @ w_old.T  # (T, d_out): W_old c_guide
        v_keep = c_p @ w_old.T  # (P, d_out): W_old c_p
        m1 = cfg.lamb * w_old + cfg.erase_scale * v_star.T @ c_e + cfg.preserve_scale * v_keep.T @ c_p
        proj.weight.copy_(xattn.ridge_solve(m1, m2).to(proj.weight.dtype))
        trained.append(f"{name}.weight")
    return EraseResult(trained=trained)


METHODS.register("uce", config=UCEConfig, description="UCE (Gandikota 2024): closed-form edit of cross-attention K/V")(
    Method(erase=erase)
)
