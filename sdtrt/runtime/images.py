"""Images in and out of the model: decoder output -> PIL (exactly as diffusers post-processes), and
PIL / files / tensors -> model input for img2img and inpainting (as diffusers' VaeImageProcessor)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..models.spec import VAE_FACTOR, nearest_sizes
from ..errors import SdtrtError


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in about [-1,1] -> uint8 [B,H,W,3]: (x/2 + 0.5) clamped, * 255, rounded (diffusers' rule)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).cpu() * 255).round().to(torch.uint8)


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    return [Image.fromarray(a.numpy()) for a in to_uint8(images)]


_FLAGS = {"image": "--image", "mask": "--mask"}


def _open(image, what: str):
    from PIL import Image

    if isinstance(image, (str, Path)):
        try:
            return Image.open(image)
        except (OSError, ValueError) as e:
            raise SdtrtError(f"cannot read {what} {image}: {e}.", f"pass a PNG/JPEG file or a PIL image as {what}",
                             cli_fix=f"pass a PNG or JPEG file to {_FLAGS[what]}") from None
    if isinstance(image, Image.Image):
        return image
    return None


def _target_size(size: tuple[int, int], height: int | None, width: int | None, resize: bool, what: str) -> tuple[int, int]:
    """(height, width) to use: as asked; else the image's own, which must be a multiple of 8 unless resize."""
    if height is not None and width is not None:
        return height, width
    w, h = size
    h, w = height or h, width or w
    if (h % VAE_FACTOR or w % VAE_FACTOR) and not resize:
        near = f"nearest valid: height {nearest_sizes(h)}, width {nearest_sizes(w)}"
        scaled = f"{w - w % VAE_FACTOR}x{h - h % VAE_FACTOR}"
        raise SdtrtError(f"{what} is {w}x{h}, not a multiple of {VAE_FACTOR} in each side.",
                         f"pass height and width ({near}), or resize=True to scale it to {scaled}",
                         cli_fix=f"pass --height and --width ({near}), or --resize to scale it to {scaled}")
    return h - h % VAE_FACTOR, w - w % VAE_FACTOR


def load_image(image, height: int | None = None, width: int | None = None, resize: bool = False) -> tuple[torch.Tensor, int, int]:
    """PIL image, path or tensor ([3,H,W] or [B,3,H,W] in [0, 1]) -> ([B,3,H,W] in [-1, 1], height, width),
    prepared as diffusers' VaeImageProcessor does (Lanczos resize, /255, 2x - 1)."""
    from PIL import Image

    pil = _open(image, "image")
    if pil is not None:
        h, w = _target_size(pil.size, height, width, resize, "the image")
        pil = pil.resize((w, h), resample=Image.LANCZOS).convert("RGB")
        data = torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8).reshape(h, w, 3)
        x = data.permute(2, 0, 1)[None].float() / 255.0
        return 2.0 * x - 1.0, h, w
    if isinstance(image, torch.Tensor):
        x = image[None] if image.dim() == 3 else image
        if x.dim() != 4 or x.shape[1] != 3:
            raise SdtrtError(f"image tensor has shape {tuple(image.shape)}.", "pass [3,H,W] or [B,3,H,W] with values in [0, 1], or a PIL image")
        h, w = _target_size((x.shape[3], x.shape[2]), height, width, resize, "the image")
        if (h, w) != tuple(x.shape[2:]):
            x = torch.nn.functional.interpolate(x.float(), size=(h, w), mode="bilinear", antialias=True)
        return 2.0 * x.float() - 1.0, h, w
    raise SdtrtError(f"cannot use {type(image).__name__} as an image.", "pass a PIL image, a file path, or a [3,H,W] tensor in [0, 1]")


def load_mask(mask, height: int, width: int, resize: bool = False, init_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Mask -> [1,1,H,W] of 0/1 (1 = repaint): grayscale, Lanczos resize, /255, threshold 0.5 (diffusers' rule)."""
    from PIL import Image

    pil = _open(mask, "mask")
    if pil is not None:
        if init_size is not None and pil.size != init_size and not resize:
            raise SdtrtError(f"the mask is {pil.size[0]}x{pil.size[1]} but the image is {init_size[0]}x{init_size[1]}.",
                             "pass a mask of the image's size, or resize=True to scale both to the output size",
                             cli_fix="pass a --mask of the --image's size, or --resize to scale both to the output size")
        try:
            gray = pil.resize((width, height), resample=Image.LANCZOS).convert("L")
        except (ValueError, OSError) as e:
            raise SdtrtError(f"the mask (mode {pil.mode}) cannot be converted to grayscale: {e}.", "save it as an 8-bit grayscale or RGB PNG") from None
        data = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).reshape(1, 1, height, width)
        m = data.float() / 255.0
    elif isinstance(mask, torch.Tensor):
        m = mask.float()
        m = m[None, None] if m.dim() == 2 else m[None] if m.dim() == 3 else m
        if m.dim() != 4 or m.shape[1] != 1:
            raise SdtrtError(f"the mask tensor has shape {tuple(mask.shape)}; a mask must be single-channel.",
                             "pass [H,W], [1,H,W] or [B,1,H,W] with values in [0, 1] (e.g. mask[..., 0] of an RGB mask)")
        if tuple(m.shape[2:]) != (height, width):
            if not resize and init_size is not None and tuple(m.shape[2:]) != (init_size[1], init_size[0]):
                raise SdtrtError(f"the mask is {m.shape[3]}x{m.shape[2]} but the image is {init_size[0]}x{init_size[1]}.",
                                 "pass a mask of the image's size, or resize=True (--resize)")
            m = torch.nn.functional.interpolate(m, size=(height, width), mode="bilinear", antialias=True)
    else:
        raise SdtrtError(f"cannot use {type(mask).__name__} as a mask.", "pass a PIL image, a file path, or an [H,W] tensor in [0, 1]")
    return (m >= 0.5).float()
