"""A procedural toy world in which concepts can be learned, erased and measured on a laptop.

Images are coloured shapes on a dark background, drawn with ground-truth labels: 6 shapes x 6 colours,
`size` pixels square (default 16), deterministic under a seed. Captions come from several templates, and
each shape has a synonym, so evaluations can use a concept's own prompts, its synonyms' prompts and other
concepts' prompts (the prompt sets of the concept-resurgence paper).

Concepts are shapes ("circle") or colours ("red"); a caption names one colour and one shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from methods.datasets.base import DATASETS, CaptionedImages, DataContext
from methods.detectors.base import DETECTORS, Detection, file_sha256, one_hot
from methods.models import MODELS, PretrainedConfig, pretrained

SHAPES = ("circle", "square", "triangle", "cross", "diamond", "bar")
SYNONYMS = {
    "circle": "disk",
    "square": "box",
    "triangle": "wedge",
    "cross": "plus",
    "diamond": "rhombus",
    "bar": "stripe",
}
COLOURS = {  # RGB, far apart so a colour is unambiguous after generation noise
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 220, 220),
}
TEMPLATES = (
    "a {colour} {shape}",
    "a drawing of a {colour} {shape}",
    "a picture of a {colour} {shape}",
    "a {shape} in {colour}",
    "one {colour} {shape} on black",
)
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges


@dataclass(frozen=True)
class Sample:
    shape: str
    colour: str
    caption: str
    image: Image.Image


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        k = r * 0.85
        return [(cx - k, cy - k), (cx + k, cy - k), (cx + k, cy + k), (cx - k, cy + k)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "bar":
        return [(cx - r, cy - r * 0.35), (cx + r, cy - r * 0.35), (cx + r, cy + r * 0.35), (cx - r, cy + r * 0.35)]
    if shape == "cross":
        a, b = r, r * 0.33
        return [
            (cx - b, cy - a),
            (cx + b, cy - a),
            (cx + b, cy - b),
            (cx + a, cy - b),
            (cx + a, cy + b),
            (cx + b, cy + b),
            (cx + b, cy + a),
            (cx - b, cy + a),
            (cx - b, cy + b),
            (cx - a, cy + b),
            (cx - a, cy - b),
            (cx - b, cy - b),
        ]
    raise ValueError(f"no polygon for {shape!r}")


def draw(shape: str, colour: str, size: int = 16, rng: np.random.Generator | None = None) -> Image.Image:
    """One image of a `colour` `shape`, centred with a small random offset, scale and background shade."""
    rng = rng or np.random.default_rng(0)
    big = size * SUPERSAMPLE
    shade = int(rng.integers(0, 40))
    img = Image.new("RGB", (big, big), (shade, shade, shade))
    d = ImageDraw.Draw(img)
    r = big * float(rng.uniform(0.30, 0.40))
    cx = big / 2 + float(rng.uniform(-0.08, 0.08)) * big
    cy = big / 2 + float(rng.uniform(-0.08, 0.08)) * big
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        d.polygon(_polygon(shape, cx, cy, r), fill=fill)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def caption(shape: str, colour: str, template: int = 0, synonym: bool = False) -> str:
    return TEMPLATES[template].format(colour=colour, shape=SYNONYMS[shape] if synonym else shape)


def samples(
    n: int,
    *,
    seed: int = 0,
    size: int = 16,
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = tuple(COLOURS),
    exclude: tuple[str, ...] = (),
    synonyms: bool = False,
) -> list[Sample]:
    """n images with labels and captions, cycling through every (shape, colour) pair that mentions no
    concept in `exclude` (shape or colour names), with random templates. Deterministic under `seed`."""
    pairs = [(s, c) for s in shapes for c in colours if s not in exclude and c not in exclude]
    if not pairs:
        raise ValueError("every (shape, colour) pair is excluded")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        s, c = pairs[i % len(pairs)]
        text = caption(s, c, int(rng.integers(len(TEMPLATES))), synonym=synonyms and bool(rng.integers(2)))
        out.append(Sample(s, c, text, draw(s, c, size, rng)))
    return out


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) in [0, 1]."""
    arr = np.stack([np.asarray(img, dtype=np.float32) / 255.0 for img in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def concept_prompts(concept: str, *, synonyms: bool = False) -> list[str]:
    """Evaluation prompts of a shape concept over every colour (its synonym's when `synonyms`), or of a
    colour concept over every shape: one template each, the first."""
    if concept in SHAPES:
        return [caption(concept, c, 0, synonym=synonyms) for c in COLOURS]
    if concept in COLOURS:
        return [caption(s, concept, 0) for s in SHAPES]
    raise ValueError(f"unknown toy concept {concept!r} (shapes: {', '.join(SHAPES)}; colours: {', '.join(COLOURS)})")


# -- the toy detector ----------------------------------------------------------------------------------
class ToyClassifier(torch.nn.Module):
    """A small CNN with two heads: which shape, which colour. (B, 3, 16, 16) in [0, 1] -> logits."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.size = size
        c = torch.nn
        self.features = c.Sequential(
            c.Conv2d(3, 32, 3, padding=1),
            c.ReLU(),
            c.Conv2d(32, 32, 3, padding=1),
            c.ReLU(),
            c.MaxPool2d(2),
            c.Conv2d(32, 64, 3, padding=1),
            c.ReLU(),
            c.Conv2d(64, 64, 3, padding=1),
            c.ReLU(),
            c.MaxPool2d(2),
            c.Flatten(),
            c.Linear(64 * (size // 4) ** 2, 128),
            c.ReLU(),
        )
        self.shape_head = c.Linear(128, len(SHAPES))
        self.colour_head = c.Linear(128, len(COLOURS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features_of(x)
        return self.shape_head(h), self.colour_head(h)

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 128) penultimate features."""
        if x.shape[-1] != self.size:
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return self.features(x * 2 - 1)


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Make clean renders look like imperfect generations: shifts, blur, brightness, noise."""
    b = x.shape[0]
    shift = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=shift, dims=(2, 3))
    blur = torch.rand(b, 1, 1, 1, generator=g) < 0.3
    soft = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = torch.where(blur, 0.5 * x + 0.5 * soft, x)
    x = x * (0.75 + 0.5 * torch.rand(b, 1, 1, 1, generator=g))
    x = x + torch.randn(x.shape, generator=g) * 0.12 * torch.rand(b, 1, 1, 1, generator=g)
    return x.clamp(0, 1)


@dataclass(frozen=True)
class DetectorReport:
    shape_accuracy: float  # on clean held-out images
    colour_accuracy: float
    noisy_shape_accuracy: float  # on held-out images through `augment`


def evaluate_detector(net: ToyClassifier, *, seed: int = 12345, n: int = 720, size: int = 16) -> DetectorReport:
    held_out = samples(n, seed=seed, size=size)
    x = to_tensor([s.image for s in held_out])
    shapes = torch.tensor([SHAPES.index(s.shape) for s in held_out])
    colours = torch.tensor([list(COLOURS).index(s.colour) for s in held_out])
    net.eval()
    with torch.no_grad():
        ps, pc = net(x)
        noisy, _ = net(augment(x, torch.Generator().manual_seed(seed)))
    return DetectorReport(
        float((ps.argmax(1) == shapes).float().mean()),
        float((pc.argmax(1) == colours).float().mean()),
        float((noisy.argmax(1) == shapes).float().mean()),
    )


def train_detector(
    *,
    seed: int = 0,
    steps: int = 600,
    batch_size: int = 128,
    size: int = 16,
    log: Callable[[int, float], None] | None = None,
) -> ToyClassifier:
    """Train the toy detector on freshly drawn, augmented images (Adam, cross-entropy on both heads)."""
    torch.manual_seed(seed)
    net = ToyClassifier(size)
    data = samples(6 * 36 * 40, seed=seed, size=size)
    x_all = to_tensor([s.image for s in data])
    y_shape = torch.tensor([SHAPES.index(s.shape) for s in data])
    y_colour = torch.tensor([list(COLOURS).index(s.colour) for s in data])
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch_size,), generator=g)
        ps, pc = net(augment(x_all[idx], g))
        loss = torch.nn.functional.cross_entropy(ps, y_shape[idx]) + torch.nn.functional.cross_entropy(
            pc, y_colour[idx]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log is not None:
            log(step, loss.item())
    net.eval()
    return net


# -- the toy text-to-image model -----------------------------------------------------------------------
@dataclass(frozen=True)
class ToyModelShape:
    """Architecture of the toy model: SD's structure, scaled down, in pixel space (no VAE)."""

    size: int = 16  # image side in pixels
    fold: int = 2  # space-to-depth factor: the UNet sees (3 fold^2, size/fold, size/fold) "latents"
    channels: tuple[int, int] = (64, 128)  # UNet block widths
    text_width: int = 32  # CLIP text encoder width = cross-attention dim
    text_layers: int = 2
    max_tokens: int = 16  # tokenizer context: captions are at most 8 tokens, SD's 77 would be padding


def build_toy_pipeline(shape: ToyModelShape = ToyModelShape(), seed: int = 0) -> Any:
    """A StableDiffusionPipeline without a VAE: CLIP text encoder with SD's tokenizer, a UNet with
    cross-attention in every block (down, mid, up), a cosine-schedule DDIM scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from methods.tokenizer import clip_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=shape.size // shape.fold,
        in_channels=3 * shape.fold**2,
        out_channels=3 * shape.fold**2,
        block_out_channels=shape.channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=shape.text_width,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            vocab_size=49408,
            hidden_size=shape.text_width,
            intermediate_size=shape.text_width * 4,
            num_attention_heads=4,
            num_hidden_layers=shape.text_layers,
            max_position_embeddings=shape.max_tokens,
        )
    )
    scheduler = DDIMScheduler(
        beta_schedule="squaredcos_cap_v2", clip_sample=True, set_alpha_to_one=True, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=None,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(max_length=shape.max_tokens),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# -- registry entries ----------------------------------------------------------------------------------
DETECTOR_WEIGHTS = Path(__file__).parent / "assets" / "toy_detector.safetensors"
MODEL_DIR = Path(__file__).parent / "assets" / "toy_model"  # a diffusers folder, fp16 safetensors


def save_toy_model(model: Any, folder: Path) -> Path:
    """Save as a diffusers folder in fp16 (half the bytes; it loads back in the compute dtype)."""
    import copy

    copy.deepcopy(model.pipe).to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return folder


def save_detector(net: ToyClassifier, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata={"size": str(net.size)})
    return path


def load_detector_net(path: Path = DETECTOR_WEIGHTS) -> ToyClassifier:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        size = int((f.metadata() or {}).get("size", 16))
    net = ToyClassifier(size)
    net.load_state_dict(load_file(str(path)))
    return net.eval()


class ToyDetectorConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    weights: str = str(DETECTOR_WEIGHTS)  # safetensors file from `resurgence toy train-detector`
    min_confidence: float = Field(0.5, ge=0, lt=1)  # below it, an image shows no recognisable shape

    def can_say_none(self) -> bool:
        return True  # an image of no class asked about (or an unsure one) counts for none

    def record(self) -> dict[str, Any]:
        return {"weights": f"sha256:{file_sha256(self.weights)}", "decision": f"shape p>={self.min_confidence}"}

    @field_validator("weights")
    @classmethod
    def _exists(cls, v: str) -> str:
        if not Path(v).is_file():
            raise ValueError(f"{v}: no such file (train one with `resurgence toy train-detector`)")
        return v


class ToyDetector:
    """Presence in the toy world: the predicted shape (or colour) of an image, as an index into the
    classes asked about; -1 when it is none of them or the detector is not confident."""

    def __init__(self, cfg: ToyDetectorConfig, device: torch.device) -> None:
        self.net = load_detector_net(Path(cfg.weights)).to(device)
        self.min_confidence = cfg.min_confidence
        self.device = device

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.net.features_of(images.to(self.device).float()), dim=-1)

    @torch.no_grad()
    def classify(self, images: torch.Tensor, classes: list[str]) -> torch.Tensor:
        shape_logits, colour_logits = self.net(images.to(self.device).float())
        shape_p, shape_i = shape_logits.softmax(-1).max(-1)
        colour_i = colour_logits.argmax(-1)
        out = torch.full((images.shape[0],), -1, dtype=torch.long)
        for b in range(images.shape[0]):
            shape, colour = SHAPES[int(shape_i[b])], list(COLOURS)[int(colour_i[b])]
            if shape in classes and float(shape_p[b]) >= self.min_confidence:
                out[b] = classes.index(shape)
            elif colour in classes:
                out[b] = classes.index(colour)
        return out

    def detect(self, images: torch.Tensor, concepts: list[str]) -> Detection:
        return Detection(one_hot(self.classify(images, concepts), len(concepts)))


@DETECTORS.register(
    "toy", config=ToyDetectorConfig, description="the toy world's shape/colour classifier (committed weights)"
)
def toy_detector(cfg: ToyDetectorConfig, device: torch.device) -> ToyDetector:
    return ToyDetector(cfg, device)


class ToyDataConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    n: int = Field(216, ge=1)  # images (cycling through the allowed shape-colour pairs)
    exclude: list[str] = Field(default_factory=list)  # shapes or colours left out entirely
    shapes: list[str] = Field(default_factory=lambda: list(SHAPES))
    colours: list[str] = Field(default_factory=lambda: list(COLOURS))
    synonyms: bool = False  # caption half the images with the shape's synonym
    seed: int = 0

    @model_validator(mode="after")
    def _known(self) -> ToyDataConfig:
        allowed = {"exclude": (*SHAPES, *COLOURS), "shapes": SHAPES, "colours": tuple(COLOURS)}
        for field, known in allowed.items():
            bad = [x for x in getattr(self, field) if x not in known]
            if bad:
                raise ValueError(f"{field}: unknown toy concept(s) {bad} (known: {', '.join(known)})")
        if not [s for s in self.shapes if s not in self.exclude] or not [
            c for c in self.colours if c not in self.exclude
        ]:
            raise ValueError("exclude: leaves no shape-colour pair")
        return self


@DATASETS.register("toy", config=ToyDataConfig, description="procedural coloured shapes with captions (toy world)")
def toy_data(cfg: ToyDataConfig, ctx: DataContext) -> CaptionedImages:
    drawn = samples(
        cfg.n,
        seed=cfg.seed,
        size=ctx.resolution,
        shapes=tuple(cfg.shapes),
        colours=tuple(cfg.colours),
        exclude=tuple(cfg.exclude),
        synonyms=cfg.synonyms,
    )
    return CaptionedImages(to_tensor([s.image for s in drawn]) * 2 - 1, [s.caption for s in drawn])


def train_toy_model(
    *,
    shape: ToyModelShape = ToyModelShape(),
    steps: int = 3500,
    batch_size: int = 64,
    lr: float = 1e-3,
    warmup: int = 200,
    uncond_prob: float = 0.1,
    seed: int = 0,
    log: Callable[[int, float, Any], None] | None = None,
) -> Any:
    """Train the toy model from scratch: UNet and text encoder jointly (a frozen random text encoder
    conditions too weakly to learn in minutes), DDPM loss, AdamW with warm-up and cosine decay, captions
    dropped to "" with `uncond_prob` so classifier-free guidance works. Fresh images every step."""
    from methods.models import DiffusionModel

    pipe = build_toy_pipeline(shape, seed)
    model = DiffusionModel(pipe, "toy")
    params = list(model.unet.parameters()) + list(model.pipe.text_encoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    pool = samples(36 * 60, seed=seed, size=shape.size, synonyms=True)  # 60 renders of every pair
    x_all = to_tensor([s.image for s in pool]) * 2 - 1
    captions = [s.caption for s in pool]
    g = torch.Generator().manual_seed(seed)
    model.unet.train()
    model.pipe.text_encoder.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(pool), (batch_size,), generator=g).tolist()
        drop = (torch.rand(batch_size, generator=g) < uncond_prob).tolist()
        texts = ["" if d else captions[i] for i, d in zip(idx, drop, strict=True)]
        loss = model.denoising_loss(model.latents_of(x_all[idx]), model.encode(texts), g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if log is not None:
            log(step, loss.item(), model)
    model.unet.eval()
    model.pipe.text_encoder.eval()
    model.requires_grad_(False)
    return model


@dataclass(frozen=True)
class GenerationReport:
    shape_accuracy: float  # fraction of generations whose shape the detector reads as the prompt's
    colour_accuracy: float
    per_shape: dict[str, float]


def generation_accuracy(
    model: Any, net: ToyClassifier, *, per_pair: int = 2, steps: int = 20, guidance_scale: float = 3.0
) -> GenerationReport:
    """How well a toy model follows prompts: every (shape, colour) pair's first-template prompt,
    `per_pair` seeds each, read back by the detector."""
    colours = list(COLOURS)
    per_shape, colour_hits, total = {}, 0, 0
    for shape in SHAPES:
        pairs = [(c, i) for c in colours for i in range(per_pair)]
        images = model.generate(
            [caption(shape, c) for c, _ in pairs], [i for _, i in pairs], steps=steps, guidance_scale=guidance_scale
        )
        with torch.no_grad():
            ps, pc = net(images)
        per_shape[shape] = float((ps.argmax(1) == SHAPES.index(shape)).float().mean())
        colour_hits += int((pc.argmax(1) == torch.tensor([colours.index(c) for c, _ in pairs])).sum())
        total += len(pairs)
    return GenerationReport(sum(per_shape.values()) / len(SHAPES), colour_hits / total, per_shape)


class ToyModelConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str = str(MODEL_DIR)  # a folder from `resurgence toy train-model`

    @field_validator("path")
    @classmethod
    def _exists(cls, v: str) -> str:
        if not (Path(v) / "model_index.json").is_file():
            raise ValueError(f"{v}: no toy model there (train one with `resurgence toy train-model`)")
        return v


@MODELS.register(
    "toy",
    config=ToyModelConfig,
    description="the toy world's trained SD-structured model (pixel space, committed weights)",
)
def toy_model(cfg: ToyModelConfig, device: torch.device, dtype: torch.dtype) -> Any:
    model = pretrained(PretrainedConfig(path=cfg.path), device, dtype)
    model.name = "toy"
    return model
