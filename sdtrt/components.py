"""The ONNX contract: one spec per network, shared by export, validation, engine profiles and the runtime.

Dimensions are symbols resolved per call:
  B   images in the batch (prompts x images per prompt)
  B2  UNet batch: 2B with classifier-free guidance ([uncond; cond], as diffusers orders it), B without
  S   text tokens: 77 (a multiple of 77 where long prompts are enabled)
  D   text embedding width (768 for SD1.x, 1024 for SD2.x)
  K   clip-skip depths the text encoder exports (see `clip_skip_max` in sdtrt.json)
  Cin UNet input channels (4, or 9 for inpainting UNets)
  h,w latent size; H,W = 8h, 8w image size in pixels
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

DYNAMIC = ("B", "B2", "S", "h", "w", "H", "W")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[str | int, ...]
    dtype: str  # "float" follows the component's precision; otherwise a fixed ONNX dtype name

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else int(sizes[d]) for d in self.dims)

    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str) and d in DYNAMIC}

    def concrete_dtype(self, precision: str) -> str:
        return ("float16" if precision == "fp16" else "float32") if self.dtype == "float" else self.dtype


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    description: str

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


TEXT_ENCODER = ComponentSpec(
    "text_encoder",
    inputs=(TensorSpec("input_ids", ("B", 77), "int32"),),
    outputs=(
        TensorSpec("text_embeddings", ("B", 77, "D"), "float"),
        # hidden states k layers before the last, through the final layer norm: diffusers' clip_skip=k
        TensorSpec("skipped_embeddings", ("B", "K", 77, "D"), "float"),
    ),
    description="CLIP text encoder: token ids -> per-token embeddings",
)

UNET = ComponentSpec(
    "unet",
    inputs=(
        TensorSpec("sample", ("B2", "Cin", "h", "w"), "float"),
        TensorSpec("timestep", (1,), "float32"),
        TensorSpec("encoder_hidden_states", ("B2", "S", "D"), "float"),
    ),
    outputs=(TensorSpec("latent", ("B2", 4, "h", "w"), "float"),),
    description="denoising UNet, classifier-free guidance batched as [uncond; cond]",
)

VAE_DECODER = ComponentSpec(
    "vae_decoder",
    inputs=(TensorSpec("latent", ("B", 4, "h", "w"), "float"),),
    outputs=(TensorSpec("images", ("B", 3, "H", "W"), "float"),),
    description="VAE decoder: latents already divided by scaling_factor -> images in [-1, 1]",
)

VAE_ENCODER = ComponentSpec(
    "vae_encoder",
    inputs=(TensorSpec("images", ("B", 3, "H", "W"), "float"),),
    outputs=(
        TensorSpec("latent_mean", ("B", 4, "h", "w"), "float"),
        TensorSpec("latent_std", ("B", 4, "h", "w"), "float"),
    ),
    description="VAE encoder: images in [-1, 1] -> latent distribution (mean, std), before scaling",
)

COMPONENTS: dict[str, ComponentSpec] = {c.name: c for c in (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)}
DEFAULT_COMPONENTS = ("text_encoder", "unet", "vae_decoder")
VAE_FACTOR = 8  # pixels per latent cell for every supported family


def nearest_sizes(v: int) -> str:
    """The valid sizes (multiples of 8 px) around `v`, for error messages: '96 or 104'."""
    lo = max(VAE_FACTOR, int(v) // VAE_FACTOR * VAE_FACTOR)
    return str(lo) if lo == v else f"{lo} or {lo + VAE_FACTOR}"


def sizes_for(batch: int, height: int, width: int, *, cfg: bool = True, text_dim: int = 768, seq: int = 77,
              clip_skip_max: int = 1, unet_in_channels: int = 4) -> dict[str, int]:
    """Concrete values for every symbol, from what a user asks for."""
    return {
        "B": batch,
        "B2": 2 * batch if cfg else batch,
        "S": seq,
        "D": text_dim,
        "K": clip_skip_max,
        "Cin": unet_in_channels,
        "h": height // VAE_FACTOR,
        "w": width // VAE_FACTOR,
        "H": height,
        "W": width,
    }


def resolve_sizes(spec: ComponentSpec, input_shapes: Mapping[str, tuple[int, ...]], fixed: Mapping[str, int]) -> dict[str, int]:
    """Symbol values implied by concrete input shapes (plus model constants such as D and K)."""
    sizes = dict(fixed)
    for t in spec.inputs:
        for d, n in zip(t.dims, input_shapes[t.name]):
            if isinstance(d, str):
                sizes[d] = int(n)
    if "h" in sizes:
        sizes.setdefault("H", sizes["h"] * VAE_FACTOR)
        sizes.setdefault("W", sizes["w"] * VAE_FACTOR)
    if "H" in sizes:
        sizes.setdefault("h", sizes["H"] // VAE_FACTOR)
        sizes.setdefault("w", sizes["W"] // VAE_FACTOR)
    return sizes


def output_shapes(spec: ComponentSpec, input_shapes: Mapping[str, tuple[int, ...]], fixed: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    sizes = resolve_sizes(spec, input_shapes, fixed)
    return {t.name: t.shape(sizes) for t in spec.outputs}
