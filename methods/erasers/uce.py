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

What is erased (`inputs`): every prompt of the concept (`prompts`, the default), the bare names (`names`, both
official scripts), or the names and five templates each (`templates`: uce_sd_erase.py's --expand_prompts,
which templates the guides the same way). Guides: one per erased concept (`guide: [..]`, the official ";"
list) or one for all. The paper-era script also preserves the empty prompt over all 77 tokens and sets
preserve_scale = max(0.1, 1 / number of preserved prompts): `preserve_empty: true`, `preserve_scale: auto`.
The official recipes are presets (docs/recipes.md). Not reproduced: train_erase.py's `tensor` technique
(its default CLI value is `replace`, the edit here).

Deviation: the experiment's other concepts' prompts are preserved by default (`preserve_others`); the
official scripts preserve what --preserve_concepts lists, the closest analogue.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import ConfigDict, Field

from methods.erasers import xattn
from methods.erasers.base import METHODS, EraseRequest, EraseResult, Method
from methods.models import DiffusionModel
from methods.presets import Preset, Presets

# uce_sd_erase.py's --expand_prompts templates, by --concept_type (applied to names and guides alike)
TEMPLATES = {
    "object": ["image of {}", "photo of {}", "portrait of {}", "picture of {}", "painting of {}"],
    "art": ["painting by {}", "art by {}", "artwork by {}", "picture by {}", "style of {}"],
}
_CURRENT = "rohitgandikota/unified-concept-editing trainscripts/uce_sd_erase.py"
_PAPER = "rohitgandikota/unified-concept-editing train-scripts/train_erase.py (paper era)"


class UCEConfig(Presets):
    model_config = ConfigDict(frozen=True, extra="forbid")

    PRESETS = {
        "uce-object": Preset(
            {
                "guide": "",
                "erase_scale": 1.0,
                "preserve_scale": 1.0,
                "lamb": 0.5,
                "tokens": "last",
                "inputs": "templates",
                "concept_type": "object",
                "preserve_empty": False,
                "with_to_k": True,
            },
            _CURRENT + " (--concept_type object --expand_prompts true)",
        ),
        "uce-art": Preset(
            {
                "guide": "art",
                "erase_scale": 1.0,
                "preserve_scale": 1.0,
                "lamb": 0.5,
                "tokens": "last",
                "inputs": "templates",
                "concept_type": "art",
                "preserve_empty": False,
                "with_to_k": True,
            },
            _CURRENT + " (--concept_type art --expand_prompts true)",
        ),
        "uce-paper": Preset(
            {
                "guide": "",
                "erase_scale": 1.0,
                "preserve_scale": "auto",
                "lamb": 0.5,
                "tokens": "all",
                "inputs": "names",
                "preserve_empty": True,
                "with_to_k": True,
            },
            _PAPER,
            note="its guide ' ' tokenizes as \"\" does; --add_prompts adds the same five templates (inputs: templates)",
        ),
    }

    guide: str | list[str] = ""  # what erased ones map to: one for all, or one per erased concept, in order
    # (a concept's synonyms count as concepts, right after it); official: "" for objects, "art" for styles
    erase_scale: float = Field(1.0, gt=0)  # a in eq. 7 (official default 1)
    preserve_scale: float | Literal["auto"] = 1.0  # b in eq. 7 (official 1; paper era auto = max(0.1, 1/n))
    lamb: float = Field(0.5, ge=0)  # ridge towards W_old (official 0.5)
    tokens: Literal["last", "all"] = "last"  # which token embeddings enter the sums (see the module doc)
    with_to_k: bool = True  # edit the key projections too, not only the values (official: both)
    preserve_others: bool = True  # preserve the experiment's other concepts' prompts
    preserve: list[str] = Field(default_factory=list)  # more prompts to preserve
    preserve_empty: bool = False  # also preserve "" (the paper-era script, over all tokens with tokens: all)
    inputs: Literal["prompts", "names", "templates"] = "prompts"  # what is erased (see the module doc)
    concept_type: Literal["object", "art"] = "object"  # which templates `inputs: templates` uses

    def check_targets(self, targets: list[tuple[str, list[str]]]) -> None:
        """Refuse guides that would make the edit a silent no-op or not what was written: one that is only
        blanks (it tokenizes to nothing, i.e. the "" guide: write "" if that is meant), one that names the
        erased concept (its tokens would be mapped onto themselves), and a list that is not one per concept."""
        guides = self.guides(len(targets))
        for (name, _), guide in zip(targets, guides, strict=True):
            if guide and not guide.strip():
                raise ValueError(
                    f'guide: {guide!r} tokenizes to nothing (the start token, as guide ""): write "" if meant'
                )
            if guide.strip() and name.lower() in guide.lower():
                raise ValueError(
                    f"guide: {guide!r} names the erased concept {name!r}: its tokens would map onto themselves"
                )

    def guides(self, n: int) -> list[str]:
        """One guide per erased concept."""
        if isinstance(self.guide, str):
            return [self.guide] * n
        if len(self.guide) not in (1, n):
            raise ValueError(f"guide: {len(self.guide)} guides for {n} erased concepts (give one, or one per concept)")
        return list(self.guide) * (n // len(self.guide))

    def erased_pairs(self, request: EraseRequest) -> list[tuple[str, str]]:
        """(erased prompt, its guide prompt) for every erase input."""
        pairs = []
        for concept, guide in zip(request.targets, self.guides(len(request.targets)), strict=True):
            if self.inputs == "prompts":
                pairs += [(p, guide) for p in concept.prompts]
                continue
            pairs.append((concept.name, guide))
            if self.inputs == "templates":
                pairs += [(t.format(concept.name), t.format(guide)) for t in TEMPLATES[self.concept_type]]
        return pairs


def _pairs(model: DiffusionModel, pairs: list[tuple[str, str]], mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Erase inputs c (T, D) and the guide inputs they map to (T, D), token by token."""
    prompts, guides = [p for p, _ in pairs], [g for _, g in pairs]
    e_old, e_guide = xattn.embeddings(model, prompts), xattn.embeddings(model, guides)  # (N, L, D) each
    length = e_old.shape[1]
    olds, news = [], []
    counts = zip(xattn.token_counts(model, prompts), xattn.token_counts(model, guides), strict=True)
    for emb, g_emb, (n, n_guide) in zip(e_old, e_guide, counts, strict=True):
        i_o, i_n = n - 2, n_guide - 2  # last sub-words (0, <|startoftext|>, for a "" guide)
        if mode == "last":
            olds.append(emb[i_o : i_o + 1])
            news.append(g_emb[i_n : i_n + 1])
        else:
            far = max(i_o, i_n)
            olds.append(emb[i_o : length - (far - i_o)])
            news.append(g_emb[i_n : length - (far - i_n)])
    return torch.cat(olds), torch.cat(news)


def _preserved(model: DiffusionModel, prompts: list[str], mode: str) -> torch.Tensor:
    if not prompts:
        return torch.zeros(0, xattn.embeddings(model, [""]).shape[-1])
    emb = xattn.embeddings(model, prompts)
    if mode == "all":
        return emb.reshape(-1, emb.shape[-1])
    return torch.stack([e[n - 2] for e, n in zip(emb, xattn.token_counts(model, prompts), strict=True)])


def preserve_scale(cfg: UCEConfig, n_retain: int) -> float:
    """b of eq. 7: the configured scale, or the paper-era rule max(0.1, 1 / number of preserved prompts)."""
    if cfg.preserve_scale == "auto":
        return max(0.1, 1.0 / max(n_retain, 1))
    return float(cfg.preserve_scale)


@torch.no_grad()
def erase(model: DiffusionModel, request: EraseRequest, cfg: UCEConfig) -> EraseResult:
    """Edit the K/V projections of `model.unet` in place (eq. 7)."""
    pairs = cfg.erased_pairs(request)
    if not pairs:
        raise ValueError("UCE needs at least one prompt of the concept to erase")
    c_e, c_g = _pairs(model, pairs, cfg.tokens)  # (T, D) each
    keep = [p for c in request.preserve for p in c.prompts] if cfg.preserve_others else []
    retain = ([""] if cfg.preserve_empty else []) + keep + list(cfg.preserve)
    c_p = _preserved(model, retain, cfg.tokens).to(c_e)  # (P, D)
    b = preserve_scale(cfg, len(retain))
    eye = torch.eye(c_e.shape[1], device=c_e.device)
    m2 = cfg.lamb * eye + cfg.erase_scale * c_e.T @ c_e + b * c_p.T @ c_p  # (D, D)
    trained = []
    for name, proj in xattn.kv_projections(model, cfg.with_to_k).items():
        w_old = proj.weight.float()  # (d_out, D)
        v_star = c_g @ w_old.T  # (T, d_out): W_old c_guide
        v_keep = c_p @ w_old.T  # (P, d_out): W_old c_p
        m1 = cfg.lamb * w_old + cfg.erase_scale * v_star.T @ c_e + b * v_keep.T @ c_p
        proj.weight.copy_(xattn.ridge_solve(m1, m2).to(proj.weight.dtype))
        trained.append(f"{name}.weight")
    return EraseResult(trained=trained)


METHODS.register("uce", config=UCEConfig, description="UCE (Gandikota 2024): closed-form edit of cross-attention K/V")(
    Method(erase=erase)
)
