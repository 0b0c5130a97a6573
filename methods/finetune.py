"""Fine-tuning ("relearning") of a text-to-image model on captioned images with the denoising loss.

This is the attack of the concept-resurgence paper (Suriyakumar et al., arXiv 2410.08074): plain
fine-tuning of the erased model, here on data the user chooses (unrelated data for benign resurgence,
images of the concept for a malicious relearning attack). Loss: DDPM's E ||eps - eps_theta(z_t, t, c)||^2.

Trainable subsets: the full UNet, its cross-attention layers only (`attn2`), LoRA adapters on the UNet's
attention projections (peft; base weights stay untouched), or the text encoder(s).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft import LoraConfig
from pydantic import BaseModel, ConfigDict, Field

from methods.datasets.base import CaptionedImages
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
    if cfg.trainable == "lora":
        if not getattr(model.unet, "peft_config", None):  # a later round trains the same adapter on
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


class Diverged(RuntimeError):
    """The fine-tuning loss went non-finite (nan or inf): the run cannot continue. Not a crash to retry: the
    same settings diverge again, so the trial ends with this as its recorded outcome."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"fine-tuning diverged at step {step} (loss {loss})")
        self.step, self.loss = step, loss


@dataclass(frozen=True)
class Distributed:
    """One rank of a data-parallel fine-tune under DeepSpeed (the process group is already up)."""

    config: dict[str, Any]  # a DeepSpeed config (ZeRO stage, offload, precision); optimizer and batch filled in here
    rank: int
    world: int


class Finetuner:
    """A fine-tune that can stop and continue: `run` trains up to `cfg.steps`, `save` writes where it is
    (the trained weights, the optimizer, the data order and random state) and `load` continues from such a
    folder, in another process after a crash. With `distributed`, every rank trains its share of each batch
    through a DeepSpeed engine (ZeRO-2 or ZeRO-3 by its config)."""

    def __init__(
        self, model: DiffusionModel, data: CaptionedImages, cfg: FinetuneConfig, distributed: Distributed | None = None
    ) -> None:
        if len(data) == 0:
            raise ValueError("the fine-tuning dataset is empty")
        self.model, self.data, self.cfg, self.dist = model, data, cfg, distributed
        self.generator = torch.Generator("cpu").manual_seed(cfg.seed)  # data order (and noise on one process)
        self.latents = model.latents_of(data.pixels, self.generator)  # (N, C, h, w): the VAE is frozen, encode once
        self.params = select_trainable(model, cfg)
        self.step = 0
        self.losses: list[float] = []
        self.order = torch.randperm(len(data), generator=self.generator)
        self.cursor = 0
        self.engine: Any = None
        if distributed is None:
            self.noise = self.generator
            model.master_weights(list(self.params.values()))
            self.optimizer = _optimizer(list(self.params.values()), cfg)
        else:
            if any(not n.startswith("unet.") for n in self.params):
                raise ValueError("DeepSpeed fine-tunes the UNet (full, xattn or lora), not the text encoder")
            # Every rank walks the same data order and takes its slice of each batch; its noise is its own.
            self.noise = torch.Generator("cpu").manual_seed(cfg.seed * 1009 + 1 + distributed.rank)
            stage = distributed.config.get("zero_optimization", {}).get("stage", 0)
            # ZeRO-3 splits the UNet's weights across ranks: rank 0 evaluates a plain copy (current_model).
            self._plain = copy.deepcopy(model) if stage == 3 and distributed.rank == 0 else None
            self.engine, self.optimizer = _deepspeed_engine(model, list(self.params.values()), cfg, distributed)

    def _batch(self) -> list[int]:
        idx = []
        for _ in range(self.cfg.batch_size):  # walk through shuffled epochs
            if self.cursor == len(self.order):
                self.order, self.cursor = torch.randperm(len(self.data), generator=self.generator), 0
            idx.append(int(self.order[self.cursor]))
            self.cursor += 1
        if self.dist is not None:
            idx = idx[self.dist.rank :: self.dist.world]
        return idx

    def _train(self, flag: bool) -> None:
        for module in self.model.modules().values():
            module.train(flag)

    def run(self, *, every: int = 0, callback: Callable[[int, float], None] | None = None) -> FinetuneResult:
        """Train from the current step to `cfg.steps`. `callback(step, loss)` runs after every `every` steps
        and after the last one (the trial evaluates there, and may `save`); steps count from 1."""
        cfg, model = self.cfg, self.model
        self._train(True)
        while self.step < cfg.steps:
            self.step += 1
            idx = self._batch()
            cond = model.encode([self.data.captions[i] for i in idx])
            loss = model.denoising_loss(self.latents[idx], cond, self.noise, unet=self.engine)
            self._check_finite(loss)
            if self.engine is not None:
                self.engine.backward(loss)
                self.engine.step()
            else:
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(self.params.values(), cfg.max_grad_norm)
                self.optimizer.step()
            self.losses.append(loss.item())
            if callback is not None and ((every and self.step % every == 0) or self.step == cfg.steps):
                self._train(False)
                callback(self.step, self.losses[-1])
                self._train(True)
        self._train(False)
        model.requires_grad_(False)
        return FinetuneResult(trained=sorted(self.params), losses=list(self.losses))

    def _check_finite(self, loss: torch.Tensor) -> None:
        bad = torch.tensor(0.0 if torch.isfinite(loss.detach()).item() else 1.0)
        if self.dist is not None:  # every rank stops together, or the others would wait in a collective
            import torch.distributed as td

            td.all_reduce(bad, op=td.ReduceOp.MAX)
        if bad.item():
            raise Diverged(self.step, float(loss.detach()))

    @contextlib.contextmanager
    def current_model(self) -> Iterator[DiffusionModel | None]:
        """The model with its current weights, to evaluate (rank 0; None on the other ranks of a ZeRO-3
        run). Every rank must enter it: ZeRO-3 keeps each weight split across the ranks, and gathering
        them is collective; they are copied into a plain model that rank 0 evaluates without the engine."""
        if self.engine is None or self.engine.zero_optimization_stage() < 3:
            yield self.model if self.dist is None or self.dist.rank == 0 else None
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.model.unet.parameters())), torch.no_grad():
            if self._plain is not None:
                for (_, p), (_, q) in zip(
                    self.model.unet.named_parameters(), self._plain.unet.named_parameters(), strict=True
                ):
                    q.copy_(p.detach().to(q.dtype))
        yield self._plain  # None on the ranks other than 0

    # -- stopping and continuing -------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        """Where this fine-tune is, into `folder` (every rank calls it when distributed)."""
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        rank = self.dist.rank if self.dist else 0
        tensors = {"generator": self.generator.get_state(), "noise": self.noise.get_state(), "order": self.order}
        save_file(tensors, str(folder / f"finetune-rank{rank}.safetensors"))
        if self.engine is not None:
            self.engine.save_checkpoint(str(folder / "deepspeed"), tag="latest")
        else:
            save_file({n: p.detach().contiguous() for n, p in self.params.items()}, str(folder / "params.safetensors"))
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        if rank == 0:
            (folder / "finetune.json").write_text(
                json.dumps({"step": self.step, "cursor": self.cursor, "losses": self.losses})
            )

    def load(self, folder: Path) -> None:
        """Continue from a folder `save` wrote (the same model, data and config)."""
        from safetensors.torch import load_file

        meta = json.loads((folder / "finetune.json").read_text())
        rank = self.dist.rank if self.dist else 0
        tensors = load_file(str(folder / f"finetune-rank{rank}.safetensors"))
        self.generator.set_state(tensors["generator"])
        self.noise.set_state(tensors["noise"])
        self.order = tensors["order"]
        self.step, self.cursor, self.losses = int(meta["step"]), int(meta["cursor"]), list(meta["losses"])
        if self.engine is not None:
            self.engine.load_checkpoint(str(folder / "deepspeed"), tag="latest")
            return
        saved = load_file(str(folder / "params.safetensors"))
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(saved[name])
        # weights_only: a checkpoint is data, never code (a shared storage may hold files of others).
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))


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
    return Finetuner(model, data, cfg).run(every=every, callback=callback)


# -- DeepSpeed -----------------------------------------------------------------------------------------
DS_OPTIMIZERS = {"adamw": "AdamW", "adam": "Adam"}  # DeepSpeed's names; SGD runs as a torch optimizer


def deepspeed_config(base: dict[str, Any], cfg: FinetuneConfig, world: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config of one fine-tune: the user's file (ZeRO stage, offload, precision) with what the
    trial searches filled in: batch sizes (cfg.batch_size is the global batch), optimizer and lr, clipping.
    "auto" precision turns bf16 on where the device supports it; keys starting with "_" are comments."""
    out = {k: v for k, v in copy.deepcopy(base).items() if not k.startswith("_")}
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of the {world} workers")
    out["train_batch_size"] = cfg.batch_size
    out["train_micro_batch_size_per_gpu"] = cfg.batch_size // world
    out["gradient_accumulation_steps"] = 1
    out["gradient_clipping"] = cfg.max_grad_norm or 0.0
    for key in ("bf16", "fp16"):
        section = out.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            ok = device.type == "cuda" and (key == "fp16" or torch.cuda.is_bf16_supported())
            section["enabled"] = bool(ok) and not (key == "fp16" and out.get("bf16", {}).get("enabled"))
    if cfg.optimizer in DS_OPTIMIZERS:
        section = out.setdefault("optimizer", {"type": DS_OPTIMIZERS[cfg.optimizer], "params": {}})
        section["type"] = DS_OPTIMIZERS[cfg.optimizer]
        params = section.setdefault("params", {})
        params["lr"] = cfg.lr
        if cfg.optimizer == "adamw":
            params["weight_decay"] = cfg.weight_decay
        params.setdefault("torch_adam", True)  # no compiled fused Adam needed (CPU runs, plain images)
    else:
        out.pop("optimizer", None)  # a torch optimizer is passed in
        out["zero_force_ds_cpu_optimizer"] = False
    out.pop("scheduler", None)  # constant lr, as in the single-process fine-tune
    return out


def _deepspeed_engine(
    model: DiffusionModel, params: list[torch.nn.Parameter], cfg: FinetuneConfig, dist: Distributed
) -> tuple[Any, Any]:
    import deepspeed

    config = deepspeed_config(dist.config, cfg, dist.world, model.device)
    client = None if cfg.optimizer in DS_OPTIMIZERS else _optimizer(params, cfg)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model.unet, model_parameters=params, optimizer=client, config=config
    )
    if config.get("bf16", {}).get("enabled"):
        model.dtype = torch.bfloat16  # the engine holds the UNet in bf16: forward passes run under autocast
    return engine, optimizer
