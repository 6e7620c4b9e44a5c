"""Images in and out: decoder output -> PIL (exactly as diffusers post-processes), PNG with an
A1111-style `parameters` text chunk, and PIL -> model input for img2img/inpainting."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in about [-1,1] -> uint8 [B,H,W,3]: (x/2 + 0.5) clamped, * 255, rounded (diffusers' rule)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).cpu() * 255).round().to(torch.uint8)


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(a.numpy()) for a in to_uint8(images)]


def a1111_parameters(p: Mapping[str, Any]) -> str:
    """The text A1111 writes into its PNGs, which many tools read back."""
    lines = [p.get("prompt", "")]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = [("Steps", p.get("steps")), ("Sampler", p.get("sampler")), ("CFG scale", p.get("guidance_scale")),
              ("Seed", p.get("seed")), ("Size", f"{p.get('width')}x{p.get('height')}"), ("Model hash", p.get("model_hash")),
              ("Clip skip", p.get("clip_skip")), ("Denoising strength", p.get("strength"))]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None) + ", Version: sdtrt")
    return "\n".join(lines)


def save_png(image, path: Path | str, parameters: str | None = None) -> Path:
    """Write a PNG through a temporary name (no half-written files), with a `parameters` chunk."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def from_pil(image, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """PIL or path -> [1,3,H,W] float32 in [-1,1], as diffusers' VaeImageProcessor prepares it."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        image = Image.open(image)
    image = image.convert("RGB")
    if height is not None and width is not None and image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)
    return (data.permute(2, 0, 1)[None].float() / 255.0) * 2.0 - 1.0
