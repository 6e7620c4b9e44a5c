"""Optimization profiles from the user's ranges.

Users speak in images and pixels: --batch MIN:OPT:MAX images per call, --height/--width in
pixels (one value = static). Each engine's profile follows from the ONNX contract:
latents are pixels / 8; the UNet sees B (guidance off) up to 2 x B_max (guidance on: [uncond; cond]);
the text encoder encodes prompts and negative prompts in one call, so also up to 2 x B_max; with
--max-prompt-chunks N (long prompts) the UNet's text axis spans 77..77N and the text encoder's batch
grows N-fold (each 77-token chunk is one row).
"""

from __future__ import annotations

import dataclasses

from ..models.spec import TEXT_LENGTH, VAE_FACTOR, ComponentSpec
from ..errors import SdtrtError
from ..runtime.request import MAX_IMAGES, MAX_SIDE

MAX_PROMPT_CHUNKS = 64  # 4,800 tokens; TensorRT's dimensions are 32-bit


@dataclasses.dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str | int, flag: str, multiple: int = 1, maximum: int | None = None) -> "Range":
        parts = [p.strip() for p in str(text).split(":")]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise SdtrtError(f"{flag} {text!r} is not MIN:OPT:MAX or a single number.", f"write e.g. {flag} 1:1:4, or {flag} 2 for a static size") from None
        if len(values) == 1:
            values *= 3
        if len(values) != 3:
            raise SdtrtError(f"{flag} {text!r} has {len(values)} parts.", f"write MIN:OPT:MAX (e.g. {flag} 1:1:4) or one value")
        lo, opt, hi = values
        if lo <= 0:
            raise SdtrtError(f"{flag} {text}: sizes must be positive.", f"e.g. {flag} {max(multiple, 1)}")
        if not lo <= opt <= hi:
            raise SdtrtError(f"{flag} {text}: needs MIN <= OPT <= MAX.", f"e.g. {flag} {min(values)}:{sorted(values)[1]}:{max(values)}")
        if maximum is not None and hi > maximum:
            raise SdtrtError(f"{flag} {text}: {hi} is more than {maximum}.", f"e.g. {flag} {lo}:{min(opt, maximum)}:{maximum} or less")
        bad = [v for v in values if v % multiple]
        if bad:
            raise SdtrtError(f"{flag} {text}: {bad[0]} is not a multiple of {multiple}.", f"use {bad[0] // multiple * multiple or multiple} or {(bad[0] // multiple + 1) * multiple}")
        return cls(lo, opt, hi)

    @property
    def static(self) -> bool:
        return self.min == self.max

    def __str__(self) -> str:
        return str(self.min) if self.static else f"{self.min}:{self.opt}:{self.max}"


@dataclasses.dataclass(frozen=True)
class Ranges:
    batch: Range
    height: Range
    width: Range
    prompt_chunks: int = 1  # long prompts (prompt_syntax="a1111"): up to 77 x this many tokens

    @classmethod
    def parse(cls, batch: str, height: str, width: str, prompt_chunks: int = 1) -> "Ranges":
        if not isinstance(prompt_chunks, int) or not 1 <= prompt_chunks <= MAX_PROMPT_CHUNKS:
            raise SdtrtError(f"--max-prompt-chunks {prompt_chunks} is outside 1-{MAX_PROMPT_CHUNKS}.",
                             "pass 1 (77 tokens) or e.g. 3 for prompts up to 225 tokens")
        return cls(Range.parse(batch, "--batch", 1, MAX_IMAGES), Range.parse(height, "--height", VAE_FACTOR, MAX_SIDE),
                   Range.parse(width, "--width", VAE_FACTOR, MAX_SIDE), prompt_chunks)


def symbol_sizes(r: Ranges, which: str, latent_factor: int = VAE_FACTOR) -> dict[str, int]:
    """The value of every per-call symbol at the profile's min, opt or max (latents: pixels / the VAE's factor)."""
    b, h, w = getattr(r.batch, which), getattr(r.height, which), getattr(r.width, which)
    low, high = which == "min", which == "max"
    return {
        "B": b,
        "B2": r.batch.min if low else 2 * b,  # guidance off at the low end, on above
        "T": r.batch.min if low else 2 * b * (r.prompt_chunks if high else 1),  # prompts + negatives (x chunks)
        "S": TEXT_LENGTH * r.prompt_chunks if high else TEXT_LENGTH,
        "H": h, "W": w, "h": h // latent_factor, "w": w // latent_factor,
    }


def profile(spec: ComponentSpec, ranges: Ranges) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """input name -> (min, opt, max) shape for one engine."""
    per = {which: symbol_sizes(ranges, which, spec.latent_factor) for which in ("min", "opt", "max")}
    return {t.name: tuple(t.shape(per[w]) for w in ("min", "opt", "max")) for t in spec.inputs}
