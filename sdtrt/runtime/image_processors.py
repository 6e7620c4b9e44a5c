"""Image preprocessing that diffusers' pipelines delegate to diffusers' VaeImageProcessor and transformers'
image processors, reproduced with PIL and torch (the runtime imports neither library):

- `pixels`: VaeImageProcessor.preprocess of a PIL batch (the x4 upscaler's: bicubic, multiples of 4).
- `dpt_pixels`: transformers' DPTImageProcessor (depth2img's depth estimator input), fixed output size.
- `clip_pixels`: transformers' CLIPImageProcessor (unCLIP's image encoder input): shortest edge, center crop.

The processors' settings come from the model's own preprocessor_config.json (stored in sdtrt.json at export).
Resizing is PIL's, on 8-bit RGB images, as in transformers; rescale and normalize follow its float path
(x * rescale_factor in float64, then float32; (x - mean) / std in float32).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import SdtrtError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pil_list(images, what: str = "image", flag: str = "--image") -> list:
    """A path, PIL image, list of them, or a [3,H,W] / [B,3,H,W] tensor in [0, 1] -> a list of RGB PIL images
    (tensors become 8-bit, as an image file would)."""
    from PIL import Image

    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise SdtrtError(f"{what} is an empty list.", f"pass one image or a list of images as {what}")
    out = []
    for item in items:
        if isinstance(item, (str, Path)):
            try:
                with Image.open(item) as im:
                    out.append(im.convert("RGB"))
            except (OSError, ValueError) as e:
                raise SdtrtError(f"cannot read {what} {item}: {e}.", f"pass a PNG/JPEG file or a PIL image as {what}",
                                 cli_fix=f"pass a PNG or JPEG file to {flag}") from None
        elif isinstance(item, Image.Image):
            out.append(item.convert("RGB"))
        elif isinstance(item, torch.Tensor):
            x = item[None] if item.dim() == 3 else item
            if x.dim() != 4 or x.shape[1] != 3:
                raise SdtrtError(f"{what} tensor has shape {tuple(item.shape)}.", "pass [3,H,W] or [B,3,H,W] with values in [0, 1], or a PIL image")
            data = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
            out += [Image.fromarray(a.numpy()) for a in data]
        else:
            raise SdtrtError(f"cannot use {type(item).__name__} as {what}.", "pass a PIL image, a file path, or a [3,H,W] tensor in [0, 1]")
    return out


def _to_tensor(pil) -> torch.Tensor:
    """8-bit RGB PIL -> uint8 [3,H,W]."""
    w, h = pil.size
    return torch.frombuffer(bytearray(pil.tobytes()), dtype=torch.uint8).reshape(h, w, 3).permute(2, 0, 1)


def resample_filter(code: int | str):
    from PIL import Image

    names = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "lanczos": Image.Resampling.LANCZOS}
    return names[code] if isinstance(code, str) else Image.Resampling(int(code))


def batch_size(pils: Sequence, multiple: int, resize: bool, what: str, flag: str) -> tuple[int, int]:
    """(height, width) the batch is used at: the first image's, which (like every image's) must be a multiple of
    `multiple` in each side unless `resize` (then floored to one, as VaeImageProcessor does)."""
    w, h = pils[0].size
    target = (h - h % multiple, w - w % multiple)
    if target[0] == 0 or target[1] == 0:
        raise SdtrtError(f"{what} is {w}x{h}, smaller than {multiple} pixels in a side.", f"pass an image at least {multiple}x{multiple}")
    if resize:
        return target
    for pil in pils:
        if pil.size != pils[0].size:
            raise SdtrtError(f"the {what}s differ in size ({pils[0].size[0]}x{pils[0].size[1]} and {pil.size[0]}x{pil.size[1]}).",
                             "pass images of one size, or resize=True to scale all to the first's",
                             cli_fix="pass images of one size, or --resize to scale all to the first's")
    if (h, w) != target:
        raise SdtrtError(f"{what} is {w}x{h}, not a multiple of {multiple} in each side.",
                         f"crop it to {target[1]}x{target[0]}, or pass resize=True to scale it there",
                         cli_fix=f"crop it to {target[1]}x{target[0]}, or pass --resize to scale it there")
    return target


def pixels(pils: Sequence, height: int, width: int, resample: int | str) -> torch.Tensor:
    """VaeImageProcessor.preprocess: each image resized to (height, width) with `resample` (PIL returns an
    unchanged copy at the same size), /255, then 2x - 1 -> [B,3,H,W] float32 in [-1, 1]."""
    filt = resample_filter(resample)
    x = torch.stack([_to_tensor(p.resize((width, height), resample=filt)) for p in pils]).float() / 255.0
    return 2.0 * x - 1.0


def _rescale_normalize(x: torch.Tensor, config: Mapping[str, Any], mean, std) -> torch.Tensor:
    """uint8 [B,3,H,W] -> transformers' rescale (float64 product, then float32) and normalize (float32)."""
    out = x.double()
    if config.get("do_rescale", True):
        out = out * float(config.get("rescale_factor", 1 / 255))
    out = out.float()
    if config.get("do_normalize", True):
        m = torch.tensor(config.get("image_mean", mean), dtype=torch.float32).view(1, -1, 1, 1)
        s = torch.tensor(config.get("image_std", std), dtype=torch.float32).view(1, -1, 1, 1)
        out = (out - m) / s
    return out


def dpt_size(config: Mapping[str, Any]) -> tuple[int, int]:
    """The fixed (height, width) DPTImageProcessor resizes every image to (keep_aspect_ratio off, no padding):
    size rounded to ensure_multiple_of as transformers' constrain_to_multiple_of rounds it."""
    size = config.get("size", 384)
    h, w = (size, size) if isinstance(size, int) else (int(size["height"]), int(size["width"]))
    m = int(config.get("ensure_multiple_of", 1) or 1)
    return round(h / m) * m, round(w / m) * m


def check_dpt_config(config: Mapping[str, Any], where: str) -> None:
    """The DPTImageProcessor settings the runtime reproduces; others are refused at export, naming them."""
    if config.get("keep_aspect_ratio") or config.get("do_pad") or not config.get("do_resize", True):
        raise SdtrtError(f"{where}: the depth estimator's preprocessor keeps the aspect ratio, pads or does not resize; sdtrt "
                         "reproduces DPTImageProcessor only with a fixed output size (keep_aspect_ratio false, do_pad false, do_resize true, "
                         "as stable-diffusion-2-depth has it).", "set those in feature_extractor/preprocessor_config.json, or pass depth maps yourself")


def dpt_pixels(pils: Sequence, config: Mapping[str, Any]) -> torch.Tensor:
    """DPTImageProcessor(images, return_tensors="pt").pixel_values for a fixed output size."""
    h, w = dpt_size(config)
    filt = resample_filter(config.get("resample", 3))
    x = torch.stack([_to_tensor(p.resize((w, h), resample=filt)) for p in pils])
    return _rescale_normalize(x, config, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def clip_size(config: Mapping[str, Any]) -> tuple[int, int]:
    """CLIPImageProcessor's crop (height, width)."""
    crop = config.get("crop_size", 224)
    return (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))


def clip_pixels(pils: Sequence, config: Mapping[str, Any]) -> torch.Tensor:
    """CLIPImageProcessor(images, return_tensors="pt").pixel_values: RGB, the shortest edge resized to
    size["shortest_edge"] (the long edge int(s * long / short)), center crop (zero-padded when the image is
    smaller), rescale, normalize with the OpenAI CLIP statistics (or the config's)."""
    size = config.get("size", 224)
    short_target = size if isinstance(size, int) else int(size.get("shortest_edge", 224))
    crop_h, crop_w = clip_size(config)
    filt = resample_filter(config.get("resample", 3))
    rows = []
    for pil in pils:
        if config.get("do_resize", True):
            w, h = pil.size
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = short_target, int(short_target * long / short)
            new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
            pil = pil.resize((new_w, new_h), resample=filt)
        x = _to_tensor(pil)
        if config.get("do_center_crop", True):
            x = _center_crop(x, crop_h, crop_w)
        rows.append(x)
    return _rescale_normalize(torch.stack(rows), config, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def _center_crop(x: torch.Tensor, crop_h: int, crop_w: int) -> torch.Tensor:
    """transformers' center_crop on [C,H,W]: top = (H - h) // 2, left = (W - w) // 2; zero padding first
    (ceil of half the shortfall on the top/left) when the image is smaller than the crop."""
    _, h, w = x.shape
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return x[:, top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    padded = x.new_zeros((x.shape[0], new_h, new_w))
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[:, pad_top : pad_top + h, pad_left : pad_left + w] = x
    top, left = top + pad_top, left + pad_left
    return padded[:, top : top + crop_h, left : left + crop_w]
