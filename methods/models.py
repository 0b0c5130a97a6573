"""Text-to-image diffusion models: the model registry and the one wrapper every method works through.

Registered models:
- `tiny-sd`, `tiny-sdxl`: seeded random models built from config with the real structure (CLIP text
  encoder(s) with SD's tokenizer, `UNet2DConditionModel` with cross-attention, `AutoencoderKL`, DDIM), in
  the way diffusers' own tests build theirs. Metrics on them are meaningless; they exercise the code.
- `pretrained`: any diffusers SD v1.x / SDXL folder or hub id through `from_pretrained` (safetensors only).

`DiffusionModel` gives methods one interface for both families: `encode` (prompt -> conditioning),
`eps` (UNet noise prediction), `latents_of` (VAE), `denoising_loss` and `generate`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from pydantic import BaseModel, ConfigDict, Field
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from methods.registry import Registry
from methods.tokenizer import clip_tokenizer

Family = Literal["sd", "sdxl"]


@dataclass
class Conditioning:
    """What the UNet is conditioned on for a batch of prompts."""

    prompt_embeds: torch.Tensor  # (B, 77, cross_attention_dim)
    added_cond_kwargs: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds (B, P), time_ids (B, 6)


def _concat(a: Conditioning, b: Conditioning) -> Conditioning:
    extra = None
    if a.added_cond_kwargs is not None and b.added_cond_kwargs is not None:
        extra = {k: torch.cat([a.added_cond_kwargs[k], b.added_cond_kwargs[k]]) for k in a.added_cond_kwargs}
    return Conditioning(torch.cat([a.prompt_embeds, b.prompt_embeds]), extra)


class DiffusionModel:
    """A diffusers SD / SDXL pipeline plus the few operations erasers and fine-tuning share."""

    def __init__(self, pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, name: str) -> None:
        self.pipe = pipe
        self.name = name
        self.family: Family = "sdxl" if isinstance(pipe, StableDiffusionXLPipeline) else "sd"
        self.dtype = pipe.unet.dtype  # compute dtype: what the weights were loaded in
        # Training noise follows the pipeline's own schedule (betas, prediction type).
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

    # -- parts ---------------------------------------------------------------------------------------
    @property
    def unet(self) -> UNet2DConditionModel:
        return self.pipe.unet

    @property
    def vae(self) -> AutoencoderKL:
        return self.pipe.vae

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        encoders = [self.pipe.text_encoder]
        if self.family == "sdxl":
            encoders.append(self.pipe.text_encoder_2)
        return encoders

    @property
    def device(self) -> torch.device:
        # The first parameter's device, as diffusers' `ModelMixin.device` ends up returning (no offloading
        # hooks are used here); diffusers first walks every submodule looking for group-offload hooks,
        # which was ~5% of a toy trial's CPU, since every denoising call asks.
        return next(self.unet.parameters()).device

    @property
    def pixel_space(self) -> bool:
        """True for models without a VAE (the toy model). Their "latents" are the pixels in [-1, 1],
        folded space-to-depth by `fold` (an exact, parameter-free stand-in for a VAE: 3 x 16 x 16 pixels
        are 12 x 8 x 8 latents for fold 2), so latent-space methods run unchanged."""
        return self.pipe.vae is None

    @property
    def fold(self) -> int:
        """Space-to-depth factor of a pixel-space model, read off its UNet: in_channels = 3 * fold^2."""
        return round((int(self.unet.config.in_channels) / 3) ** 0.5) if self.pixel_space else 1

    @property
    def resolution(self) -> int:
        """Image side in pixels that the UNet was built for."""
        factor = self.fold if self.pixel_space else self.pipe.vae_scale_factor
        return int(self.unet.config.sample_size) * factor

    def modules(self) -> dict[str, torch.nn.Module]:
        parts = {"unet": self.unet, "text_encoder": self.pipe.text_encoder}
        if not self.pixel_space:
            parts["vae"] = self.vae
        if self.family == "sdxl":
            parts["text_encoder_2"] = self.pipe.text_encoder_2
        return parts

    def requires_grad_(self, flag: bool) -> None:
        for module in self.modules().values():
            module.requires_grad_(flag)

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Every parameter by a model-wide name: "unet.<name>", "text_encoder.<name>", ..."""
        return {f"{key}.{n}": p for key, module in self.modules().items() for n, p in module.named_parameters()}

    @torch.no_grad()
    def effective_weights(self) -> dict[str, torch.Tensor]:
        """Every weight as the forward pass sees it, by a name that adapters do not change: a LoRA
        layer's base weight plus its delta, under the base layer's name."""
        out: dict[str, torch.Tensor] = {}
        for key, module in self.modules().items():
            for name, p in module.named_parameters():
                if "lora_" not in name:
                    out[f"{key}.{name.replace('.base_layer', '')}"] = p.detach()
            for name, layer in module.named_modules():
                if hasattr(layer, "get_delta_weight") and getattr(layer, "active_adapters", None):
                    w = f"{key}.{name}.weight"
                    out[w] = out[w] + sum(layer.get_delta_weight(a) for a in layer.active_adapters).to(out[w].dtype)
        return out

    # -- operations ----------------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> Conditioning:
        """Prompt -> conditioning, as the pipelines do it (SDXL: penultimate layers of both encoders
        concatenated, pooled output of the second, size/crop time ids). Keeps gradients, so text-encoder
        training can call it."""
        with self.autocast():
            return self._encode(prompts)

    def _encode(self, prompts: list[str]) -> Conditioning:
        if self.family == "sd":
            ids = self._token_ids(self.pipe.tokenizer, prompts)
            return Conditioning(self.pipe.text_encoder(ids)[0].float())
        hidden, pooled = [], None
        for tokenizer, encoder in (
            (self.pipe.tokenizer, self.pipe.text_encoder),
            (self.pipe.tokenizer_2, self.pipe.text_encoder_2),
        ):
            out = encoder(self._token_ids(tokenizer, prompts), output_hidden_states=True)
            hidden.append(out.hidden_states[-2].float())  # (B, 77, d_i)
            pooled = out[0].float()  # the last encoder's projected pooled output, (B, P)
        size = self.resolution
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=self.device, dtype=torch.float32)
        return Conditioning(
            torch.cat(hidden, dim=-1),  # (B, 77, d_1 + d_2)
            {"text_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)},
        )

    def _token_ids(self, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)

    def autocast(self) -> torch.autocast:
        """Mixed precision for UNet and text-encoder forward passes: weights stored in half precision run
        in it, and trained (fp32 master) weights are cast on the fly. Off for fp32 models."""
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def master_weights(self, params: list[torch.nn.Parameter]) -> None:
        """Keep trained parameters in fp32 (Adam on half-precision weights loses small updates:
        docs/background.md §6); forward passes run under `autocast`."""
        for p in params:
            p.data = p.data.float()

    def eps(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning, unet: Any = None) -> torch.Tensor:
        """The UNet's prediction (noise, or v for v-prediction models) for noisy latents at timesteps t.
        `unet` defaults to this model's; ESD passes its frozen copy."""
        with self.autocast():
            return (unet or self.unet)(
                latents, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs
            ).sample.float()

    def unconditional(self, n: int) -> Conditioning:
        """The empty prompt's conditioning, as the pipelines use it for classifier-free guidance (SDXL
        with `force_zeros_for_empty_prompt` uses zeros)."""
        cond = self.encode([""] * n)
        if self.family == "sdxl" and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            extra = dict(cond.added_cond_kwargs or {})
            extra["text_embeds"] = torch.zeros_like(extra["text_embeds"])
            return Conditioning(torch.zeros_like(cond.prompt_embeds), extra)
        return cond

    @torch.no_grad()
    def latents_of(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> scaled VAE latents (B, C, H/f, W/f), in fp32."""
        if self.pixel_space:
            return torch.nn.functional.pixel_unshuffle(pixels.to(self.device).float(), self.fold)
        vae = self.vae  # outside autocast: SDXL's VAE must stay in fp32
        dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        return (dist.sample(generator) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def pixels_of(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0, 1], (B, 3, H, W), fp32 on the CPU."""
        if self.pixel_space:
            return ((torch.nn.functional.pixel_shuffle(latents.float(), self.fold) + 1) / 2).clamp(0, 1).cpu()
        vae = self.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1).cpu()

    def denoising_loss(
        self, latents: torch.Tensor, cond: Conditioning, generator: torch.Generator | None = None, unet: Any = None
    ) -> torch.Tensor:
        """The diffusion training loss E_{t, eps} ||target - eps_theta(z_t, t, c)||^2 (DDPM, Ho et al. 2020),
        with t uniform over the training timesteps and target = eps (or v for v-prediction)."""
        sched = self.noise_scheduler
        b = latents.shape[0]
        # Drawn on the CPU from a CPU generator, so runs repeat across devices.
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator).to(latents.device)
        noisy = sched.add_noise(latents, noise, t)
        target = sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise
        return torch.nn.functional.mse_loss(self.eps(noisy, t, cond, unet), target)

    def noise(self, seeds: list[int]) -> torch.Tensor:
        """Initial latents, one seeded draw per image (an image does not depend on its batch)."""
        c = self.unet.config
        shape = (c.in_channels, c.sample_size, c.sample_size)
        draws = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        return torch.stack(draws).to(self.device)

    @torch.no_grad()
    def sample(
        self,
        cond: Conditioning,
        uncond: Conditioning,
        z: torch.Tensor,
        *,
        steps: int,
        guidance_scale: float,
        stop_at: int | None = None,
        unet: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM (eta = 0) with classifier-free guidance from initial noise z, for `stop_at` of `steps` steps
        (all by default). Returns the latents and the timestep they are at (ESD's `run_till_timestep`)."""
        sched = DDIMScheduler.from_config(self.pipe.scheduler.config)
        sched.set_timesteps(steps, device=self.device)
        z = z.float() * sched.init_noise_sigma
        both = _concat(uncond, cond)
        stop = steps if stop_at is None else stop_at
        for t in sched.timesteps[:stop]:
            e_uncond, e_cond = self.eps(torch.cat([z, z]), t, both, unet).chunk(2)
            z = sched.step(e_uncond + guidance_scale * (e_cond - e_uncond), t, z).prev_sample
        t_end = sched.timesteps[stop] if stop < len(sched.timesteps) else torch.tensor(0, device=self.device)
        return z, t_end.expand(z.shape[0])

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], *, steps: int, guidance_scale: float) -> torch.Tensor:
        """One image per (prompt, seed) pair: DDIM with classifier-free guidance, decoded by the VAE.
        (B, 3, H, W) in [0, 1] on the CPU."""
        cond = self.encode(list(prompts))
        latents, _ = self.sample(
            cond, self.unconditional(len(prompts)), self.noise(seeds), steps=steps, guidance_scale=guidance_scale
        )
        return self.pixels_of(latents)


@torch.no_grad()
def weight_distance(a: DiffusionModel, b: DiffusionModel) -> float:
    """L2 distance between two models' effective weights (only the parameters that differ contribute):
    a method's footprint. Resurgence is strongest when erased weights stay close to the base (docs/background.md §1)."""
    wa, wb = a.effective_weights(), b.effective_weights()
    total = 0.0
    for name, x in wa.items():
        y = wb.get(name)
        if y is not None and x.shape == y.shape:
            total += float((x.float() - y.float()).pow(2).sum())
    return total**0.5


# -- the registry ------------------------------------------------------------------------------------
MODELS: Registry[Any] = Registry("model")


class TinyConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0  # torch.manual_seed before each component, as in diffusers' tests
    sample_size: int = Field(16, ge=8, le=64)  # UNet latent side; images are twice that (VAE factor 2)


class PretrainedConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str  # a local diffusers folder, or a hub id such as CompVis/stable-diffusion-v1-4
    allow_download: bool = False  # False: local files and the local HF cache only (no network surprises)
    revision: str | None = None  # hub revision (branch, tag or commit) for reproducibility
    variant: str | None = None  # weight variant such as "fp16"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # Half precision only on a GPU (CPU half kernels are slow); bf16 where the GPU has it, since
        # training without loss scaling is safe in bf16's range and not in fp16's. Trained weights are
        # fp32 either way (DiffusionModel.master_weights).
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def _place(pipe: Any, device: torch.device, dtype: torch.dtype) -> Any:
    pipe.to(device)
    if pipe.unet.dtype != dtype:
        pipe.to(dtype=dtype)
    if isinstance(pipe, StableDiffusionXLPipeline):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16 (docs/background.md §6)
    return pipe


def _tiny_unet(cfg: TinyConfig, sdxl: bool) -> UNet2DConditionModel:
    torch.manual_seed(cfg.seed)
    common = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=cfg.sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )
    if not sdxl:
        return UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=8)
    return UNet2DConditionModel(
        **common,
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + pooled text (32)
    )


def _tiny_text_config(**extra: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=49408,
        hidden_act="gelu",
        **extra,
    )


def sd_scheduler() -> DDIMScheduler:
    """SD v1.4's (and SDXL's) noise schedule, for pipelines built from config."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _tiny_parts(cfg: TinyConfig) -> tuple[AutoencoderKL, DDIMScheduler]:
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=cfg.sample_size * 2,
    )
    return vae, sd_scheduler()


@MODELS.register("tiny-sd", config=TinyConfig, description="seeded random SD-v1-structured model (tests)")
def tiny_sd(cfg: TinyConfig, device: torch.device, dtype: torch.dtype) -> DiffusionModel:
    unet = _tiny_unet(cfg, sdxl=False)
    vae, scheduler = _tiny_parts(cfg)
    torch.manual_seed(cfg.seed)
    text_encoder = CLIPTextModel(_tiny_text_config())
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return DiffusionModel(_place(pipe, device, dtype), "tiny-sd")


@MODELS.register("tiny-sdxl", config=TinyConfig, description="seeded random SDXL-structured model (tests)")
def tiny_sdxl(cfg: TinyConfig, device: torch.device, dtype: torch.dtype) -> DiffusionModel:
    unet = _tiny_unet(cfg, sdxl=True)
    vae, scheduler = _tiny_parts(cfg)
    torch.manual_seed(cfg.seed)
    text_encoder = CLIPTextModel(_tiny_text_config())
    torch.manual_seed(cfg.seed)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(projection_dim=32))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    return DiffusionModel(_place(pipe, device, dtype), "tiny-sdxl")


def pretrained_family(cfg: PretrainedConfig) -> Family:
    """Which pipeline a pretrained model needs, from its `model_index.json`; raises a one-line
    ValueError (or FileNotFoundError) when the model is not there. Reads no weights."""
    return _family(cfg, model_index(cfg))


def _family(cfg: PretrainedConfig, index: dict[str, Any]) -> Family:
    class_name = index.get("_class_name", "")
    if "XL" in class_name:
        return "sdxl"
    if class_name.startswith("StableDiffusion"):
        return "sd"
    raise ValueError(f"{cfg.path}: pipeline class {class_name!r} is not a Stable Diffusion v1.x or SDXL one")


def model_index(cfg: PretrainedConfig) -> dict[str, Any]:
    """The model's `model_index.json`, from its folder or the HF cache (or the hub, if allowed)."""
    local = Path(os.path.expanduser(cfg.path))
    if cfg.path.startswith(("/", "./", "../", "~")) and not local.exists():
        raise FileNotFoundError(f"{cfg.path}: no such folder")
    if local.exists():
        index = local / "model_index.json"
        if not index.is_file():
            raise FileNotFoundError(f"{cfg.path} is not a diffusers model folder (no model_index.json)")
        for part in ("unet", "vae", "text_encoder"):  # weights load from safetensors only
            if (local / part).is_dir() and not any((local / part).glob("*.safetensors")):
                raise FileNotFoundError(f"{cfg.path}/{part} has no .safetensors weights (pickle files are refused)")
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            index = Path(
                hf_hub_download(
                    cfg.path, "model_index.json", revision=cfg.revision, local_files_only=not cfg.allow_download
                )
            )
        except LocalEntryNotFoundError:
            hint = "" if cfg.allow_download else " (set allow_download: true to fetch it from the hub)"
            raise FileNotFoundError(f"{cfg.path!r} is neither a local folder nor in the HF cache{hint}") from None
        except (HfHubHTTPError, ValueError, OSError) as err:
            raise FileNotFoundError(f"cannot fetch {cfg.path!r}: {str(err).splitlines()[0]}") from None
    return json.loads(index.read_text())


@MODELS.register(
    "pretrained", config=PretrainedConfig, description="a diffusers SD v1.x / SDXL folder or hub id (safetensors only)"
)
def pretrained(cfg: PretrainedConfig, device: torch.device, dtype: torch.dtype) -> DiffusionModel:
    index = model_index(cfg)
    family = _family(cfg, index)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    # Components saved as absent (e.g. the toy model's VAE) must be passed as None explicitly.
    extra: dict[str, Any] = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    if family == "sd":
        extra.update(safety_checker=None, requires_safety_checker=False)
    # No loading progress bars: in a sweep every worker's would be streamed to the driver's log.
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe = cls.from_pretrained(
        os.path.expanduser(cfg.path),
        use_safetensors=True,
        local_files_only=not cfg.allow_download,
        revision=cfg.revision,
        variant=cfg.variant,
        dtype=dtype,
        **extra,
    )
    return DiffusionModel(_place(pipe, device, dtype), cfg.path)


def load_model(
    name: str, options: BaseModel | dict[str, Any] | None = None, *, device: str = "auto", dtype: str = "auto"
) -> DiffusionModel:
    """A registered model; `options` is its typed config (as the spec validated it) or a mapping for it."""
    entry = MODELS.get(name)
    cfg = (
        options
        if isinstance(options, BaseModel) or entry.config is None
        else entry.config.model_validate(options or {})
    )
    dev = resolve_device(device)
    model = entry.obj(cfg, dev, resolve_dtype(dtype, dev))
    model.requires_grad_(False)  # methods switch on exactly what they train
    return model


# -- persistence of an edited model: only what changed ----------------------------------------------
DELTA_FILE = "weights.safetensors"


@torch.no_grad()
def save_changed(model: DiffusionModel, base: DiffusionModel, folder: Path) -> list[str]:
    """Save the parameters of `model` that differ from `base` (an erased model is mostly its base: UCE and
    ESD-x touch a few percent of the UNet) as safetensors under `folder`; returns their names."""
    from safetensors.torch import save_file

    ref = base.named_parameters()
    changed = {
        name: p.detach().to("cpu").contiguous()
        for name, p in model.named_parameters().items()
        if name not in ref or ref[name].shape != p.shape or not torch.equal(ref[name], p)
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(changed, str(folder / DELTA_FILE))
    return sorted(changed)


@torch.no_grad()
def load_changed(model: DiffusionModel, folder: Path) -> list[str]:
    """Overwrite `model`'s parameters (a fresh copy of the base) with those `save_changed` wrote."""
    from safetensors.torch import load_file

    saved = load_file(str(folder / DELTA_FILE))
    params = model.named_parameters()
    unknown = [n for n in saved if n not in params or params[n].shape != saved[n].shape]
    if unknown:
        raise ValueError(f"{folder / DELTA_FILE}: {len(unknown)} tensors do not fit this model (e.g. {unknown[0]})")
    for name, value in saved.items():
        params[name].copy_(value.to(params[name].device, params[name].dtype))
    return sorted(saved)


# -- what a trial costs ----------------------------------------------------------------------------------
def reset_peak_memory(device: torch.device) -> None:
    """Start counting a peak of device memory afresh (a trial's own; nothing on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory torch allocated since `reset_peak_memory` (0 on the CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
