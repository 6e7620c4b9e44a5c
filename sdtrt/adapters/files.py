"""Reading adapter files: safetensors always, pickle (.pt/.ckpt/.bin/.pth) only when the caller opts in.

Pickle can run arbitrary code when it is loaded, so it is refused unless the user says the file is
trusted (`allow_pickle=True`, CLI `--allow-pickle`); even then only tensors, containers and plain
values are unpickled (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import SdtrtError

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def read_file(path: Path, allow_pickle: bool) -> tuple[Any, dict[str, str]]:
    """(what the file holds, its safetensors metadata): a flat {name: tensor} for safetensors; for
    pickle whatever was saved (a state dict, A1111's nested dict, or a bare tensor), metadata empty."""
    path = Path(path)
    if not path.is_file():
        what = "a folder, not a file" if path.is_dir() else "missing"
        raise SdtrtError(f"adapter file {path} is {what}.", "check the path (LoRA, LyCORIS and embedding files are single "
                         ".safetensors files; for a diffusers folder pass its pytorch_lora_weights.safetensors)")
    suffix = path.suffix.lower()
    if suffix in SAFE_SUFFIXES:
        return read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise SdtrtError(f"{path} is a pickle file ({suffix}); loading pickle can run arbitrary code, so it is refused by default.",
                             "convert it to .safetensors, or, if you trust its source, pass allow_pickle=True",
                             "convert it to .safetensors, or, if you trust its source, pass --allow-pickle")
        return read_pickle(path), {}
    raise SdtrtError(f"{path} has an unknown file type {suffix or '(no suffix)'!r}.",
                     f"adapters are {', '.join(SAFE_SUFFIXES + PICKLE_SUFFIXES)} files (pickle only with allow_pickle=True)",
                     f"adapters are {', '.join(SAFE_SUFFIXES + PICKLE_SUFFIXES)} files (pickle only with --allow-pickle)")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path), device="cpu"), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise SdtrtError(f"{path} is not a readable safetensors file ({e}).", "download or copy the file again") from None


def read_pickle(path: Path) -> Any:
    import pickle

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SdtrtError(f"{path} holds Python objects other than tensors and plain values ({str(e).splitlines()[0]}).",
                         "convert it to .safetensors with the tool that made it") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise SdtrtError(f"{path} is not a readable PyTorch file ({e}).", "download or copy the file again") from None


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def listing(names: list[str], first: int = 5) -> str:
    """'a, b, c (and 12 more)' for error messages."""
    shown = ", ".join(names[:first])
    return shown + (f" (and {len(names) - first} more)" if len(names) > first else "")
