"""What erasure and fine-tuning cost the model elsewhere: CLIP score on unrelated prompts and FID against a
reference image folder, the utility metrics the erasure papers report beside presence (on COCO captions).

- CLIP score: 100 x max(cos(image embedding, prompt embedding), 0), averaged over the images (the definition
  torchmetrics' CLIPScore uses), with an open_clip model (ViT-B/32 "openai" by default, or a checkpoint file).
- FID: the Fréchet distance between Gaussians fitted to Inception pool features (2048-d) of the generated
  images and of the reference folder's images: ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2). The network is
  the Inception v3 variant of the TensorFlow FID code (pytorch-fid's FID blocks on torchvision's Inception);
  its weights (pt_inception-2015-12-05, no package ships them) come from a local file, safetensors or a
  weights-only state dict. Inputs are resized to 299 px (bilinear) and scaled to [-1, 1], as in pytorch-fid.
  Tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of S1 S2 (real and >= 0 up to rounding,
  as S1 S2 is similar to S1^1/2 S2 S1^1/2), which stays finite when few images make S1 singular. FID from
  a few hundred images is biased upward; compare FIDs only at the same image count (it is recorded).

Images are generated like the presence evaluation's (its steps, guidance, seeds and batch size).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from methods.detectors.base import file_sha256, package_version
from methods.evaluation.presence import EvalConcept, EvalConfig, jobs
from methods.evaluation.prompts import PromptSetConfig
from methods.models import DiffusionModel
from methods.weights import WeightsError, check_fits, load_into, read_state_dict

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ClipScoreConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompts: PromptSetConfig  # unrelated prompts (COCO captions)
    model: str = "ViT-B-32"  # an open_clip model name (tiny-test: random, for tests)
    pretrained: str | None = "openai"  # open_clip tag or checkpoint file; null: random (tiny-test)
    images_per_prompt: int = Field(1, ge=1)
    seed: int = 0  # seeds random weights (tiny-test)

    @model_validator(mode="after")
    def _known(self) -> ClipScoreConfig:
        self.clip()  # the same checks as the clip detector's
        return self

    def clip(self) -> Any:
        """The open_clip model as the clip detector's config (methods.detectors.clip.ClipConfig)."""
        from methods.detectors.clip import ClipConfig

        return ClipConfig(model=self.model, pretrained=self.pretrained, seed=self.seed)

    def record(self) -> dict[str, Any]:
        model = {k: v for k, v in self.clip().record().items() if k in ("package", "model", "weights")}
        return {
            **model,
            "images": len(self.prompts.prompts()) * self.images_per_prompt,
            "prompts": self.prompts.record(),
        }


def fid_inception(seed: int | None = None) -> torch.nn.Module:
    """The FID Inception v3 (TensorFlow's 2015-12-05 graph as pytorch-fid ports it), for its weights to be
    loaded into; with `seed`, random weights that keep activations at scale (He-initialised convolutions:
    torch's defaults shrink the pool features to ~1e-8 over Inception's depth), for smoke tests."""
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.data = torch.randn(m.weight.shape, generator=g) * (2 / fan_in) ** 0.5
    return net


def image_files(folder: str) -> list[str]:
    folder = os.path.expanduser(folder)
    return sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES
    )


class FidConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompts: PromptSetConfig  # what to generate (COCO captions)
    reference: str  # a folder of reference images (e.g. the COCO images of those captions)
    weights: str | None  # the FID Inception weights (pt_inception-2015-12-05), safetensors or a weights-only
    # state dict; null: random weights (seeded; smoke tests only, the distance then means nothing)
    images_per_prompt: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)  # images through Inception at once
    seed: int = 0  # seeds random weights

    _weights_sha256: str = PrivateAttr("")
    _reference_images: int = PrivateAttr(0)

    @model_validator(mode="after")
    def _check(self) -> FidConfig:
        if not os.path.isdir(os.path.expanduser(self.reference)):
            raise ValueError(f"reference: {self.reference}: no such folder")
        found = len(image_files(self.reference))
        generated = len(self.prompts.prompts()) * self.images_per_prompt
        if found < max(2, generated):
            raise ValueError(
                f"reference: {self.reference} has {found} images; FID needs at least as many as it generates "
                f"({generated}) and 2 or more"
            )
        if generated < 2:
            raise ValueError("prompts: FID needs 2 or more generated images (prompts x images_per_prompt)")
        self._reference_images = found
        if self.weights is None:
            return self
        try:
            with torch.device("meta"):
                net = fid_inception()
            check_fits(net, read_state_dict(self.weights, meta_only=True), self.weights, "FID Inception v3")
        except WeightsError as err:
            raise ValueError(f"weights: {err}") from None
        self._weights_sha256 = file_sha256(os.path.expanduser(self.weights))
        return self

    def record(self) -> dict[str, Any]:
        return {
            "package": f"pytorch-fid=={package_version('pytorch-fid')}",
            "weights": f"sha256:{self._weights_sha256}" if self.weights else f"random (seed {self.seed})",
            "images": len(self.prompts.prompts()) * self.images_per_prompt,
            "reference_images": self._reference_images,
            "features": "pool3 2048, 299 px bilinear",
            "prompts": self.prompts.record(),
        }


class UtilityConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    clip_score: ClipScoreConfig | None = None
    fid: FidConfig | None = None

    def record(self) -> dict[str, Any]:
        return {
            name: cfg.record() for name, cfg in (("clip_score", self.clip_score), ("fid", self.fid)) if cfg is not None
        }


def frechet_distance(mu1: torch.Tensor, s1: torch.Tensor, mu2: torch.Tensor, s2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2), in float64."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    root = torch.linalg.eigvals(s1 @ s2).real.clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * root)


def gaussian(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of (N, D) features."""
    f = features.double()
    return f.mean(0), torch.cov(f.T)


class Utility:
    """The utility metrics of a spec, loaded once per worker (networks, the reference statistics)."""

    def __init__(self, cfg: UtilityConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self.clip = self.fid_net = None
        self.reference: tuple[torch.Tensor, torch.Tensor] | None = None
        if cfg.clip_score is not None:
            from methods.detectors.clip import ClipZeroShot

            self.clip = ClipZeroShot(cfg.clip_score.clip(), device)
        if cfg.fid is not None:
            if cfg.fid.weights is None:
                net = fid_inception(seed=cfg.fid.seed)
            else:
                net = load_into(fid_inception(), cfg.fid.weights, "FID Inception v3")
            self.fid_net = net.eval().to(device)
            self.fid_net.fc = torch.nn.Identity()  # pool3 features (2048), not the 1008 logits
            self.reference = gaussian(self.fid_features(_read_images(image_files(cfg.fid.reference))))

    @torch.no_grad()
    def fid_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, 2048) pool3 features."""
        step = self.cfg.fid.batch_size  # type: ignore[union-attr]
        out = []
        for i in range(0, len(images), step):
            x = F.interpolate(images[i : i + step].to(self.device).float(), size=(299, 299), mode="bilinear")
            out.append(self.fid_net(2 * x - 1).flatten(1).cpu())  # type: ignore[misc]
        return torch.cat(out)

    def measure(self, model: DiffusionModel, gen: EvalConfig) -> dict[str, float]:
        out = {}
        if self.cfg.clip_score is not None:
            out["clip_score"] = self._clip_score(model, gen)
        if self.cfg.fid is not None:
            images = _generate(model, self.cfg.fid.prompts, self.cfg.fid.images_per_prompt, gen)[0]
            out["fid"] = frechet_distance(*gaussian(self.fid_features(images)), *self.reference)  # type: ignore[misc]
        return out

    @torch.no_grad()
    def _clip_score(self, model: DiffusionModel, gen: EvalConfig) -> float:
        c = self.cfg.clip_score
        images, texts = _generate(model, c.prompts, c.images_per_prompt, gen)  # type: ignore[union-attr]
        image_vec = self.clip.embed(images)  # type: ignore[union-attr]
        text_vec = self.clip.embed_text(texts)  # type: ignore[union-attr]
        return float((100 * (image_vec * text_vec).sum(-1)).clamp(min=0).mean())


def _generate(
    model: DiffusionModel, prompts: PromptSetConfig, per_prompt: int, gen: EvalConfig
) -> tuple[torch.Tensor, list[str]]:
    settings = gen.model_copy(update={"images_per_prompt": per_prompt})
    images, texts = [], []
    for batch in jobs(EvalConcept("utility", prompts.prompts()), settings):
        texts += [p for p, _, _ in batch]
        images.append(
            model.generate(
                [p for p, _, _ in batch], [s for _, s, _ in batch], steps=gen.steps, guidance_scale=batch[0][2]
            )
        )
    return torch.cat(images), texts


def _read_images(paths: list[str]) -> torch.Tensor:
    """Image files -> (N, 3, 299, 299) in [0, 1] (each resized on its own: the folder's sizes may differ)."""
    out = []
    for p in paths:
        with Image.open(p) as im:
            x = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy())
        x = x.permute(2, 0, 1).unsqueeze(0).float() / 255
        out.append(F.interpolate(x, size=(299, 299), mode="bilinear"))
    return torch.cat(out)
