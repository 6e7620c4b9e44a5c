"""Images over HTTP: base64 in (strictly decoded, checked to be an image PIL can read, never a path),
model inputs out ([1,3,H,W] / [1,1,H,W] tensors in [0, 1], prepared exactly as the runtime prepares a PIL
image, so a request batched as tensors gets the pixels it would get alone), base64 PNG back."""

from __future__ import annotations

import base64
import binascii
import io
import re

import torch

from ..outputs import encode
from .errors import ApiError, bad_type, invalid

_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,")


def decode_image(field: str, value, max_pixels: int):
    """A base64 string (optionally a data: URL, as A1111 accepts) -> a loaded PIL image, or a 422 naming the field."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(value, str):
        raise bad_type(field, value, "a base64-encoded PNG/JPEG/WebP string")
    text = _DATA_URL.sub("", value.strip(), count=1)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, f"{field} is not valid base64.", "send the image file's bytes base64-encoded (standard alphabet, padded)") from None
    if not data:
        raise invalid(field, f"{field} is empty.", "send an image")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if width * height > max_pixels:
                raise ApiError(422, "limit_exceeded", f"{field} is {width}x{height}, more than this server's {max_pixels} pixels.",
                               field=field, fix="send a smaller image (it is resized to width x height anyway)")
            probe.verify()
        image = Image.open(io.BytesIO(data))
        image.load()
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise invalid(field, f"{field} is not an image PIL can read ({str(e)[:120]}).", "send a PNG, JPEG or WebP file, base64-encoded") from None
    return image


def to_tensor(image, height: int, width: int) -> torch.Tensor:
    """PIL -> [1,3,H,W] in [0, 1]: Lanczos resize to (width, height), RGB, /255 - the runtime's own steps for a
    PIL image (runtime.images.load_image), so the tensor path gives the same numbers bit for bit."""
    from PIL import Image

    rgb = image.resize((width, height), resample=Image.LANCZOS).convert("RGB")
    data = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return data.permute(2, 0, 1)[None].float() / 255.0


def mask_tensor(mask, height: int, width: int) -> torch.Tensor:
    """PIL mask -> [1,1,H,W] in [0, 1]: Lanczos resize, grayscale, /255 (runtime.images.load_mask's steps)."""
    from PIL import Image

    gray = mask.resize((width, height), resample=Image.LANCZOS).convert("L")
    data = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).reshape(1, 1, height, width)
    return data.float() / 255.0


def png_base64(image, parameters: str | None) -> str:
    return base64.b64encode(encode(image, "PNG", parameters)).decode("ascii")
