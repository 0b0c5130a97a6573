"""Weights files the user gives (a classifier's, FID's Inception): safetensors or a weights-only PyTorch state
dict. Pickles that need code to load are refused (`torch.load(weights_only=True)` rejects them), and a file
is checked against the architecture it is for, key by key and shape by shape, before any compute starts.
"""

from __future__ import annotations

import os

import torch

SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")


class WeightsError(ValueError):
    """A weights file that is missing, unsafe or for another architecture (the message is one line)."""


def _unwrap(obj: object, path: str) -> dict[str, torch.Tensor]:
    # A training checkpoint often nests the weights: {"state_dict": {...}} or {"model": {...}}.
    if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "module"):
            if isinstance(obj.get(key), dict):
                return _unwrap(obj[key], path)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_state_dict(path: str, *, meta_only: bool = False) -> dict[str, torch.Tensor]:
    """A weights file's tensors. `meta_only`: shapes only (tensors on the meta device), for checking."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                if meta_only:
                    return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
                return {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"{path}: not a safetensors file ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=meta_only)
    except RuntimeError:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure to unpickle safely is the same refusal
            raise WeightsError(_unsafe(path, err)) from None
    except Exception as err:  # noqa: BLE001
        raise WeightsError(_unsafe(path, err)) from None
    return _unwrap(obj, path)


def _unsafe(path: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"{path}: not loadable as weights only (pickles that need code to load are refused; save the "
        f"state_dict, or use safetensors): {first[:160]}"
    )


def check_fits(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: str, arch: str) -> None:
    """Refuse weights that are not `module`'s: a missing or unexpected key, or a shape that differs."""
    want = module.state_dict()
    missing = [k for k in want if k not in weights]
    unexpected = [k for k in weights if k not in want]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise WeightsError(
            f"{path}: not {arch} weights ({what}; {len(missing)} missing, {len(unexpected)} unexpected keys)"
        )
    for k, v in want.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise WeightsError(
                f"{path}: not {arch} weights ({k} is {tuple(weights[k].shape)}, {arch} needs {tuple(v.shape)})"
            )


def load_into(module: torch.nn.Module, path: str, arch: str) -> torch.nn.Module:
    weights = read_state_dict(path)
    check_fits(module, weights, path, arch)
    module.load_state_dict(weights, strict=True)
    return module
