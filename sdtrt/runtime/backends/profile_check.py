"""Refuse a request outside an engine's optimization profile before anything runs, in the user's terms."""

from __future__ import annotations

from typing import Any, Mapping

from ...models.spec import VAE_FACTOR, ComponentSpec
from ...errors import SdtrtError

# symbol -> (what the user calls it, build flag that widens it, multiplier to the flag's unit)
_USER_TERMS = {
    "B": ("batch (images)", "--batch", 1),
    "T": ("text-encoder batch (prompts plus negative prompts, x prompt chunks)", "--batch", 1),
    "B2": ("UNet batch (2 x images with guidance on)", "--batch", 1),
    "h": ("height", "--height", VAE_FACTOR),
    "w": ("width", "--width", VAE_FACTOR),
    "H": ("height", "--height", 1),
    "W": ("width", "--width", 1),
    "S": ("text length in tokens (77 per prompt chunk)", "--max-prompt-chunks", 1),
}


def check_profile(spec: ComponentSpec, profile: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], rebuild: str) -> None:
    """Raise SdtrtError naming the profile's range (input -> [min, opt, max]) and the build flag that widens it."""
    component = spec.name
    for t in spec.inputs:
        if t.name not in shapes:
            continue
        lo_shape, _, hi_shape = profile[t.name]
        for axis, (value, lo, hi) in enumerate(zip(shapes[t.name], lo_shape, hi_shape)):
            if lo <= value <= hi:
                continue
            symbol, _, divisor = str(t.dims[axis]).partition("/")
            what, flag, scale = _USER_TERMS.get(symbol, (f"dimension {axis}", "the build flags", 1))
            scale = (spec.latent_factor if symbol in ("h", "w") else scale) * int(divisor or 1)
            unit = " px" if flag in ("--height", "--width") else ""
            have = f"{lo * scale}-{hi * scale}{unit}"
            example = f"{flag} {-(-value // 77)}" if flag == "--max-prompt-chunks" else f"{flag} MIN:OPT:MAX"
            raise SdtrtError(
                f"the {component} engine cannot take {t.name} with {what} = {value * scale}{unit}: its profile covers {have}.",
                f"rebuild with a wider range, e.g. {rebuild} {example} (or request a size inside {have})")
