"""The ONNX contract of one network: its tensors, their symbolic dimensions, and what export,
validation, engine profiles and the runtime need to know about it — written once, per component.

A component spec is made by a function of the model's config (see `sdtrt.models.components`), so
widths, channels and extra inputs are concrete numbers; only the per-call dimensions are symbols:

  B   images in the batch (prompts x images per prompt)
  B2  UNet batch: 2B with classifier-free guidance ([uncond; cond], as diffusers orders it), B without
  T   text-encoder rows: prompts and negative prompts together (x chunks for long prompts)
  S   text tokens seen by the UNet: 77, or a multiple of 77 with long prompts
  h,w latent size; H,W = 8h, 8w image size in pixels (f·h, f·w for a VAE with f pixels per latent cell:
      `ComponentSpec.latent_factor`, 4 for the x4 upscaler's)
  h/2, w/4, ...  the latent size after 1, 2, ... UNet down-samplings: ceil(h / 2^k) (a stride-2 conv
                 with padding 1 rounds up), e.g. ControlNet residuals
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

DYNAMIC = ("B", "B2", "T", "S", "h", "w", "H", "W")
VAE_FACTOR = 8  # pixels per latent cell for every supported family
TEXT_LENGTH = 77  # CLIP's context: bos + 75 tokens + eos

# Relative error = max|onnx - torch| / max|torch| per output, against the fp32 torch module.
# fp32: ONNX Runtime and torch differ only in kernel order and fusions (~1e-6); 1e-3 leaves head-room
#       for full-size models yet fails any changed weight.
# fp16: half precision keeps about 3 decimal digits per op over dozens of layers; measured on the
#       tiny and sd15 models at well under 1e-2.
TOLERANCES = {"fp32": 1e-3, "fp16": 2e-2}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[str | int, ...]
    dtype: str = "float"  # "float" follows the component's precision; otherwise a fixed ONNX dtype name
    sample: str = "noise"  # how export makes a real-shaped input: noise | ids | timestep | image | time_ids

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else symbol_value(d, sizes) for d in self.dims)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}

    def concrete_dtype(self, precision: str) -> str:
        return ("float16" if precision == "fp16" else "float32") if self.dtype == "float" else self.dtype


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    """One exported network. `load(model_dir, allow_pickle)` builds the torch module (export only;
    it imports diffusers/transformers lazily) whose forward has exactly these inputs and outputs."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str
    weights: str  # the diffusers subfolder holding its weights
    prefix: str  # ONNX initializer name = prefix + the torch parameter name in that subfolder's model
    load: Callable[[Any, bool], Any] = dataclasses.field(compare=False, repr=False)
    fp16: bool = True  # exported in fp16 by --dtype fp16 (VAEs: only with --fp16-vae)
    trace_side: int = 64  # image side (px) the module is traced at (the graph is the same at every size)
    sample_values: Mapping[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)  # fixed inputs, e.g. time ids
    ids_range: tuple[int, int, int] = (0, 49406, 49407)  # (low, bos, eos) token ids for sample ids
    token_embedding: str | None = None  # a text encoder's token embedding (torch name), grown for Textual Inversion
    tolerances: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(TOLERANCES))
    latent_factor: int = VAE_FACTOR  # pixels per latent cell (H = factor x h): the model's VAE's, 2^(down blocks - 1)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in self.inputs + self.outputs:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor named {name}")

    def output_shapes(self, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        sizes = resolve_sizes(self, input_shapes)
        return {t.name: t.shape(sizes) for t in self.outputs}


def symbol_value(symbol: str, sizes: Mapping[str, int]) -> int:
    """A symbol's value: `sizes[symbol]`, or for "h/4" (a down-sampled latent side) ceil(h / 4)."""
    base, _, divisor = symbol.partition("/")
    return int(sizes[symbol]) if not divisor else -(-int(sizes[base]) // int(divisor))


def downsampled(symbol: str, level: int) -> str | int:
    """The symbol for `symbol` (h or w) after `level` stride-2 down-samplings."""
    return symbol if level == 0 else f"{symbol}/{2 ** level}"


def resolve_sizes(spec: ComponentSpec, input_shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Symbol values implied by concrete input shapes."""
    sizes: dict[str, int] = {}
    for t in spec.inputs:
        if t.name not in input_shapes:
            continue
        for d, n in zip(t.dims, input_shapes[t.name]):
            if isinstance(d, str) and "/" not in d:
                sizes[d] = int(n)
    f = spec.latent_factor
    if "h" in sizes:
        sizes.setdefault("H", sizes["h"] * f)
        sizes.setdefault("W", sizes["w"] * f)
    if "H" in sizes:
        sizes.setdefault("h", sizes["H"] // f)
        sizes.setdefault("w", sizes["W"] // f)
    return sizes


def sizes_for(batch: int, height: int, width: int, *, cfg: bool = True, text_rows: int | None = None,
              seq: int = TEXT_LENGTH, latent_factor: int = VAE_FACTOR) -> dict[str, int]:
    """Concrete values for every symbol, from what a user asks for."""
    return {"B": batch, "B2": 2 * batch if cfg else batch, "T": text_rows or (2 * batch if cfg else batch), "S": seq,
            "h": height // latent_factor, "w": width // latent_factor, "H": height, "W": width}


def nearest_sizes(v: int) -> str:
    """The valid sizes (multiples of 8 px) around `v`, for error messages: '96 or 104'."""
    lo = max(VAE_FACTOR, int(v) // VAE_FACTOR * VAE_FACTOR)
    return str(lo) if lo == v else f"{lo} or {lo + VAE_FACTOR}"
