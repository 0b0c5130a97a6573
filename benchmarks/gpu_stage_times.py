"""Stage times and peak memory of SD v1.4 and SDXL on one GPU, through this project's own code (methods/), with
the real architectures built from their configs (random weights: the time of a forward or backward pass does
not depend on the values). These are the figures `sim_cluster.py`'s stage table models, measured.

    python benchmarks/gpu_stage_times.py                        # a CUDA machine: both models (~4 min on an H200)
    python benchmarks/gpu_stage_times.py --models sd14 --skip esd,mace
    python benchmarks/gpu_stage_times.py --tiny --device cpu    # the same code on the tiny models (a smoke run)

Per model (every stage that trains or erases on a fresh model, so that one stage's fp32 master weights or LoRA
adapters do not slow the next; generation and the proxy share one):
- `load`: the base pipeline saved as safetensors and loaded back through `load_model("pretrained", ...)` (the
  files are in the page cache: a warm read, not a cold disk's);
- `generate`: images at 50 DDIM steps with classifier-free guidance (the evaluation's sampling), at batch 1, 4
  and the evaluation's 16; `classify`: a CLIP ViT-L/14 vision tower (transformers, from config) on 40 images
  at 224 px, standing for the detector; `eval`: 40 images at the batched rate plus `classify`;
- `proxy`: the cheap early-stopping signal (methods/evaluation/proxy.py `probe_loss`: 20 probe images x 4 fixed draws)
  against `eval`; the probe itself is drawn once per worker (`make_probe`, timed too);
- `finetune`: optimizer steps of `Finetuner` (AdamW, fp32 master weights of what trains, bf16 autocast) per
  trainable subset, at batch 4 (SD v1.4, 512 px) or 2 (SDXL, 1024 px), after 3 warm-up steps;
- `erase`: UCE, few-shot and MACE end to end at their defaults (their drawn concept images included); ESD's
  time per iteration (its default is 200 iterations, the paper's 1000);
- `cache`: what the erase cache writes and reads for a UCE erasure (`save_changed` / `load_changed`).

Printed: one line per stage (seconds, peak GPU memory), then a JSON object with every figure (also written to
`--out`). Timings synchronise the GPU; each follows a warm-up call (fine-tuning: 3 warm-up steps).

Measured on one NVIDIA H200 (Dec 2026; torch 2.11, diffusers 0.42.1, bf16; two runs, the second for generation
at batch 1, 4 and 16 and the proxy). SD v1.4 (UNet 860M) / SDXL (UNet 2,568M, text encoders 123M + 695M):
- generation, seconds per image at 50 steps: batch 1 2.6-4.0 / 6.2-6.6, batch 4 0.68 / 2.30, batch 16 0.37 /
  2.08 (peak 11.6 / 66.8 GiB): at small batches the step is launch-bound (50-85 ms on SD v1.4 up to batch 8);
- classify 40 images (ViT-L/14): 0.017 s; evaluation of 40 images at batch 16: 14.7 / 83.3 s;
- proxy: the probe's 21 images drawn once per worker in 8.2 / 45 s, then `probe_loss` 0.34 / 1.78 s per rung:
  the evaluation costs 43x / 47x the proxy;
- fine-tuning step (batch 4 at 512 px / batch 2 at 1024 px): full 0.214 / 0.559 s (peak 19.7 / 61.8 GiB),
  xattn 0.119 / 0.395, LoRA 0.275 / 0.830, text encoder 0.155 / 0.406 (peaks 8.1 / 31.5 GiB);
- erasure: UCE 0.40 / 1.18 s, few-shot 6.2 / 14.8 s, MACE 15.0 / 48.8 s (their drawn images included), ESD
  1.72 / 3.59 s per iteration (343 / 719 s at the default 200, 1,716 / 3,593 s at the paper's 1000): upper
  bounds, measured before the builders froze the model as `load_model` does, so every UNet weight got a
  gradient where ESD-x needs only the cross-attention's (not rerun: the session's GPU time was spent);
- the erase cache for UCE: 32 / 140 tensors, 36.6 / 650 MiB, written in 0.09 / 0.39 s, read in 0.02 / 0.11 s;
- the base pipeline saved as 2.0 / 6.6 GiB of safetensors, loaded through `load_model` in 1.2 / 4.0 s (from the
  page cache).
Random weights give the real shapes and costs but meaningless images; nothing here checks output quality.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods.catalog import METHODS  # noqa: E402  (registers every eraser)
from methods.datasets.base import CaptionedImages, DataContext  # noqa: E402
from methods.erasers.base import Concept, EraseRequest  # noqa: E402
from methods.evaluation.presence import EvalConfig
from methods.evaluation.proxy import ProxyConfig, make_probe, probe_loss  # noqa: E402
from methods.finetune import FinetuneConfig, Finetuner  # noqa: E402
from methods.models import (  # noqa: E402
    DiffusionModel,
    _place,  # the registry's own placement (SDXL's VAE kept in fp32), for pipelines built here
    load_changed,
    load_model,
    save_changed,
    sd_scheduler,
)
from methods.tokenizer import clip_tokenizer  # noqa: E402

CONCEPT = Concept("van gogh", ["a painting in the style of van gogh", "a van gogh landscape", "starry night"])
OTHERS = [Concept("monet", ["a painting in the style of monet"]), Concept("ship", ["a photo of a ship"])]
EVAL_IMAGES = 40  # images per evaluation (sim_cluster.py's EVAL_IMAGES)
STAGES = ("generate", "classify", "proxy", "load", "finetune", "uce", "fewshot", "mace", "esd", "cache")
EVAL_BATCH = EvalConfig().batch_size  # images the evaluation generates at once (16)
SETTINGS = {  # per model: fine-tuning batch (sim_cluster.py's), generation batches timed
    "sd14": {"ft_batch": 4, "gen_batches": (1, 4, EVAL_BATCH)},
    "sdxl": {"ft_batch": 2, "gen_batches": (1, 4, EVAL_BATCH)},
}


# -- the architectures, from their published configs ---------------------------------------------------------------
def _vae(sample_size: int) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=sample_size,
    )


def _clip_text(hidden: int, layers: int, heads: int, act: str, projection: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        hidden_act=act,
        projection_dim=projection,
        max_position_embeddings=77,
        vocab_size=49408,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _ready(pipe: Any, device: torch.device, dtype: torch.dtype, name: str) -> DiffusionModel:
    """Placed and frozen as `load_model` leaves a model: methods switch on exactly what they train (ESD relies on
    it: its objective turns gradients on for its subset only)."""
    model = DiffusionModel(_place(pipe, device, dtype), name)
    model.requires_grad_(False)
    return model


def sd14(device: torch.device, dtype: torch.dtype) -> DiffusionModel:
    """CompVis/stable-diffusion-v1-4's architecture: UNet 860M (diffusers' defaults are SD v1's), CLIP ViT-L/14
    text encoder 123M, VAE 84M."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: seconds instead of a minute of CPU init
        pipe = StableDiffusionPipeline(
            vae=_vae(512),
            text_encoder=CLIPTextModel(_clip_text(768, 12, 12, "quick_gelu", 768)),
            tokenizer=clip_tokenizer(),
            unet=UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
            scheduler=sd_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return _ready(pipe, device, dtype, "sd14-config")


def sdxl(device: torch.device, dtype: torch.dtype) -> DiffusionModel:
    """stabilityai/stable-diffusion-xl-base-1.0's architecture: UNet 2.6B, CLIP ViT-L 123M + OpenCLIP ViT-bigG
    695M text encoders, VAE 84M (kept in fp32)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    with torch.device(device):
        pipe = StableDiffusionXLPipeline(
            vae=_vae(1024),
            text_encoder=CLIPTextModel(_clip_text(768, 12, 12, "quick_gelu", 768)),
            text_encoder_2=CLIPTextModelWithProjection(_clip_text(1280, 32, 20, "gelu", 1280)),
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer(pad_token="!"),
            unet=UNet2DConditionModel(
                sample_size=128,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(320, 640, 1280),
                transformer_layers_per_block=(1, 2, 10),
                attention_head_dim=(5, 10, 20),
                cross_attention_dim=2048,
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + pooled text 1280
            ),
            scheduler=sd_scheduler(),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    return _ready(pipe, device, dtype, "sdxl-config")


def tiny(family: str) -> Callable[[torch.device, torch.dtype], DiffusionModel]:
    name = "tiny-sd" if family == "sd14" else "tiny-sdxl"
    return lambda device, dtype: load_model(name, device=str(device), dtype=str(dtype).removeprefix("torch."))


# -- timing ---------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak(device: torch.device, out: dict[str, Any]) -> Iterator[None]:
    """Peak GPU memory allocated inside the block, in GiB, into out["peak_gib"]."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield
    if device.type == "cuda":
        sync(device)
        out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def timed(device: torch.device, fn: Callable[[], Any], repeats: int) -> float:
    """Mean seconds of `fn` over `repeats` calls after one warm-up call."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def once(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of one call of `fn`, and what it returned."""
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - start, value


def params_m(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)


# -- the stages -----------------------------------------------------------------------------------------------------
def stage_load(build: Callable[..., DiffusionModel], device: torch.device, dtype: torch.dtype, work: Path) -> dict:
    folder = work / "pipeline"
    pipe = build(device, dtype).pipe
    t_save, _ = once(device, lambda: pipe.save_pretrained(folder, safe_serialization=True))
    pipe = None  # free the GPU before loading the copy
    size = sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 2**30
    out: dict[str, Any] = {"save_s": round(t_save, 2), "files_gib": round(size, 2)}
    with peak(device, out):
        t_load, _ = once(device, lambda: load_model("pretrained", {"path": str(folder)}, device=device.type))
    out["load_s"] = round(t_load, 2)
    return out


def stage_generate(model: DiffusionModel, device: torch.device, batches: tuple[int, ...], steps: int) -> dict:
    """Seconds per image at each batch size (one warm-up call per size first), the peak memory at the largest."""
    prompts = CONCEPT.prompts + OTHERS[0].prompts + OTHERS[1].prompts

    def draw(n: int) -> Callable[[], Any]:
        return lambda: model.generate(
            [prompts[i % len(prompts)] for i in range(n)], list(range(n)), steps=steps, guidance_scale=7.5
        )

    out: dict[str, Any] = {"steps": steps, "per_image_s": {}}
    for n in batches:
        model.generate([prompts[i % len(prompts)] for i in range(n)], list(range(n)), steps=2, guidance_scale=7.5)
        with peak(device, out):
            seconds = once(device, draw(n))[0]
        out["per_image_s"][n] = round(seconds / n, 3)
        out["per_step_ms"] = round(1000 * seconds / steps, 1)  # of the largest batch, once the loop ends
    return out


def stage_classify(device: torch.device, dtype: torch.dtype, tiny_run: bool) -> dict:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = (
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=32,
        )
        if tiny_run
        else CLIPVisionConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            projection_dim=768,
        )  # ViT-L/14
    )
    with torch.device(device):
        tower = CLIPVisionModelWithProjection(cfg).to(dtype).eval()
    images = torch.rand(EVAL_IMAGES, 3, cfg.image_size, cfg.image_size, device=device, dtype=dtype)
    with torch.no_grad():
        seconds = timed(device, lambda: tower(pixel_values=images).image_embeds, 3)
    return {"images": EVAL_IMAGES, "classify_s": round(seconds, 3), "params_m": params_m(tower)}


def stage_proxy(model: DiffusionModel, device: torch.device, tiny_run: bool) -> dict:
    cfg = ProxyConfig(images_per_prompt=7, repeats=4)  # 3 prompts x 7 = 21 probe images
    eval_cfg = EvalConfig(steps=10 if tiny_run else 50, guidance_scale=7.5)
    out: dict[str, Any] = {}
    t_probe, probe = once(device, lambda: make_probe(model, CONCEPT.prompts, cfg, eval_cfg))
    out["make_probe_s"] = round(t_probe, 2)
    out["probe_images"], out["repeats"] = len(probe.prompts), cfg.repeats
    with peak(device, out):
        out["probe_loss_s"] = round(timed(device, lambda: probe_loss(model, probe), 3), 3)
    return out


def synthetic_images(n: int, resolution: int) -> CaptionedImages:
    gen = torch.Generator("cpu").manual_seed(0)
    pixels = torch.rand(n, 3, resolution, resolution, generator=gen) * 2 - 1
    return CaptionedImages(pixels, [f"a photo of a landscape, number {i}" for i in range(n)])


def stage_finetune(model: DiffusionModel, device: torch.device, trainable: str, batch: int, steps: int) -> dict:
    data = synthetic_images(4 * batch, model.resolution)
    warm = 3
    cfg = FinetuneConfig(trainable=trainable, lr=1e-6, steps=warm + steps, batch_size=batch)  # type: ignore[arg-type]
    out: dict[str, Any] = {"batch": batch}
    stamps: list[float] = []

    def stamp(step: int, loss: float) -> None:  # loss.item() has synchronised already
        stamps.append(time.perf_counter())

    with peak(device, out):
        tuner = Finetuner(model, data, cfg)
        out["trained_m"] = round(sum(p.numel() for p in tuner.params.values()) / 1e6, 1)
        tuner.run(every=1, callback=stamp)
    out["step_s"] = round((stamps[-1] - stamps[warm - 1]) / steps, 4)
    return out


def erase_request(model: DiffusionModel, work: Path) -> EraseRequest:
    data = DataContext(resolution=model.resolution, cache_dir=work / "images", model=model, model_key=model.name)
    return EraseRequest(targets=[CONCEPT], preserve=list(OTHERS), seed=0, data=data)


def stage_erase(
    build: Callable[..., DiffusionModel],
    device: torch.device,
    dtype: torch.dtype,
    method: str,
    options: dict[str, Any],
    work: Path,
) -> dict:
    model = build(device, dtype)
    entry = METHODS.get(method)
    cfg = entry.config.model_validate(options)
    out: dict[str, Any] = {"config": options}
    request = erase_request(model, work / method)
    with peak(device, out):
        out["erase_s"] = round(once(device, lambda: entry.obj.erase(model, request, cfg))[0], 2)
    return out


def stage_esd_iteration(
    build: Callable[..., DiffusionModel], device: torch.device, dtype: torch.dtype, iterations: int, work: Path
) -> dict:
    model = build(device, dtype)
    entry = METHODS.get("esd")
    out: dict[str, Any] = {"timed_iterations": iterations}
    with peak(device, out):
        cfg = entry.config.model_validate({"iterations": 1})
        objective = entry.obj.objective(model, erase_request(model, work / "esd"), cfg)
        optimizer = objective.optimizer()
        step = iter(range(10**6))

        def one() -> None:
            loss = objective.loss(next(step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        out["per_iteration_s"] = round(timed(device, one, iterations), 3)
        objective.close()
    out["default_200_s"] = round(200 * out["per_iteration_s"], 1)
    out["paper_1000_s"] = round(1000 * out["per_iteration_s"], 1)
    return out


def stage_cache(build: Callable[..., DiffusionModel], device: torch.device, dtype: torch.dtype, work: Path) -> dict:
    base = build(device, dtype)
    erased = copy.deepcopy(base)
    entry = METHODS.get("uce")
    entry.obj.erase(erased, erase_request(erased, work / "uce"), entry.config.model_validate({}))
    folder = work / "cache-entry"
    t_save, names = once(device, lambda: save_changed(erased, base, folder))
    out: dict[str, Any] = {"save_changed_s": round(t_save, 3), "tensors": len(names)}
    out["entry_mib"] = round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20, 1)
    out["load_changed_s"] = round(once(device, lambda: load_changed(base, folder))[0], 3)
    return out


# -- the run --------------------------------------------------------------------------------------------------------
def run_model(family: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    build = tiny(family) if args.tiny else {"sd14": sd14, "sdxl": sdxl}[family]
    settings = SETTINGS[family]
    skip = set(args.skip.split(",")) if args.skip else set()
    result: dict[str, Any] = {}

    def stage(name: str, fn: Callable[[], dict]) -> None:
        if name.split(".")[0] in skip:
            return
        start = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as err:  # a stage that fails is reported, the others still run
            result[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  {family:5} {name:22} {json.dumps(result[name])}  [{time.perf_counter() - start:.0f} s]", flush=True)

    with tempfile.TemporaryDirectory(prefix=f"stages-{family}-") as tmp:
        work = Path(tmp)
        base = build(device, dtype)
        result["params_m"] = {key: params_m(m) for key, m in base.modules().items()}
        print(f"  {family:5} {'params (M)':22} {json.dumps(result['params_m'])}", flush=True)
        steps = 10 if args.tiny else 50
        stage("generate", lambda: stage_generate(base, device, settings["gen_batches"], steps))
        stage("classify", lambda: stage_classify(device, dtype, args.tiny))
        stage("proxy", lambda: stage_proxy(base, device, args.tiny))
        base = None  # the later stages build their own
        stage("load", lambda: stage_load(build, device, dtype, work))
        batch = settings["ft_batch"]
        for trainable in ("xattn", "lora", "text_encoder", "full"):
            stage(
                f"finetune.{trainable}",
                lambda t=trainable: stage_finetune(build(device, dtype), device, t, batch, args.ft_steps),
            )
        stage("uce", lambda: stage_erase(build, device, dtype, "uce", {}, work))
        stage("fewshot", lambda: stage_erase(build, device, dtype, "fewshot", {}, work))
        stage("mace", lambda: stage_erase(build, device, dtype, "mace", {}, work))
        stage("esd", lambda: stage_esd_iteration(build, device, dtype, args.esd_iterations, work))
        stage("cache", lambda: stage_cache(build, device, dtype, work))
    gen, cls = result.get("generate", {}), result.get("classify", {})
    if EVAL_BATCH in gen.get("per_image_s", {}) and "classify_s" in cls:
        eval_s = EVAL_IMAGES * gen["per_image_s"][EVAL_BATCH] + cls["classify_s"]
        result["eval_s"] = round(eval_s, 2)
        if "probe_loss_s" in result.get("proxy", {}):
            result["eval_over_proxy"] = round(eval_s / result["proxy"]["probe_loss_s"], 1)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="sd14,sdxl", help="comma-separated: sd14, sdxl")
    p.add_argument("--tiny", action="store_true", help="the tiny test models instead (a smoke run of this script)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--ft-steps", type=int, default=10, help="timed fine-tuning steps per subset")
    p.add_argument("--esd-iterations", type=int, default=5, help="timed ESD iterations")
    p.add_argument("--skip", default="", help="comma-separated stages to skip (generate, proxy, load, finetune, ...)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    families = [m for m in args.models.split(",") if m]
    unknown = [m for m in families if m not in SETTINGS]
    if unknown or not families:
        print(
            f"gpu_stage_times: --models: unknown model {unknown[0] if unknown else ''!r} (sd14, sdxl)", file=sys.stderr
        )
        return 2
    bad_skip = sorted(set(filter(None, args.skip.split(","))) - set(STAGES))
    if bad_skip:
        print(f"gpu_stage_times: --skip: unknown stage {bad_skip[0]!r} ({', '.join(STAGES)})", file=sys.stderr)
        return 2
    if args.ft_steps < 1 or args.esd_iterations < 1:
        print("gpu_stage_times: --ft-steps and --esd-iterations must be at least 1", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_stage_times: no CUDA device (use --tiny --device cpu for a smoke run)", file=sys.stderr)
        return 2
    dtype = (
        torch.float32 if device.type == "cpu" else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
    }
    print(json.dumps(info), flush=True)
    report: dict[str, Any] = {"info": info}
    for family in families:
        report[family] = run_model(family, args, device, dtype)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
