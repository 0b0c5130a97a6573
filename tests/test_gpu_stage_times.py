"""benchmarks/gpu_stage_times.py: the architectures it builds are SD v1.4's and SDXL's, and its stages run.

The GPU figures themselves come from a GPU machine (README); here the script's code runs on the tiny models and
the full-size configs are built on the meta device (shapes only, no memory)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_stage_times.py"


@pytest.fixture(scope="module")
def stages():
    spec = importlib.util.spec_from_file_location("gpu_stage_times", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def millions(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 1)


@pytest.mark.parametrize(
    "family, expected",
    [
        # The published parameter counts (CompVis/stable-diffusion-v1-4, stabilityai/stable-diffusion-xl-base-1.0).
        ("sd14", {"unet": 859.5, "text_encoder": 123.1, "vae": 83.7}),
        ("sdxl", {"unet": 2567.5, "text_encoder": 123.1, "text_encoder_2": 694.7, "vae": 83.7}),
    ],
)
def test_full_size_architectures_match_the_published_models(stages, family, expected):
    build = {"sd14": stages.sd14, "sdxl": stages.sdxl}[family]
    model = build(torch.device("meta"), torch.bfloat16)
    assert {key: millions(m) for key, m in model.modules().items()} == expected
    assert model.resolution == (512 if family == "sd14" else 1024)
    assert not any(p.requires_grad for p in model.named_parameters().values())  # frozen, as load_model leaves it


def test_stages_run_on_the_tiny_models(stages, tmp_path, capsys):
    out = tmp_path / "stages.json"
    skip = "proxy,load,fewshot,mace,esd"
    code = stages.main(
        ["--tiny", "--device", "cpu", "--models", "sd14", "--ft-steps", "1", "--skip", skip, "--out", str(out)]
    )
    assert code == 0
    report = json.loads(out.read_text())["sd14"]
    ran = ["generate", "classify", "uce", "cache"] + [
        f"finetune.{t}" for t in ("xattn", "lora", "text_encoder", "full")
    ]
    assert not [name for name in ran if "error" in report[name]], report
    assert report["cache"]["tensors"] > 0  # UCE changed some K/V matrices and the cache entry holds them
    assert report["finetune.full"]["trained_m"] > report["finetune.xattn"]["trained_m"]
    assert report["eval_s"] > 0
    assert "proxy" not in report


@pytest.mark.parametrize(
    "args, field",
    [(["--models", "sd14,sd3"], "--models"), (["--skip", "finetun"], "--skip"), (["--ft-steps", "0"], "--ft-steps")],
)
def test_bad_flags_are_usage_errors_before_any_work(stages, capsys, args, field):
    assert stages.main(["--tiny", "--device", "cpu", *args]) == 2
    err = capsys.readouterr()
    assert field in err.err
    assert err.out == ""  # nothing was built or timed
