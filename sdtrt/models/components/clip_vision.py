"""transformers' CLIPVisionModelWithProjection: unCLIP's image encoder (OpenCLIP ViT-H/14 in
stabilityai/stable-diffusion-2-1-unclip, OpenAI ViT-L/14 in its -small variant).

pixel_values [B,3,S,S] (CLIPImageProcessor's output: shortest edge, center crop, normalized) -> image_embeds [B,P]
(the projected pooled output). S comes from the model's feature_extractor config, so the graph is static in its
image size; the runtime reproduces the processor (runtime/image_processors.py: clip_pixels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..spec import ComponentSpec, TensorSpec


def spec(config: Mapping[str, Any], image_size: tuple[int, int]) -> ComponentSpec:
    """`config`: image_encoder/config.json (a CLIPVisionConfig); `image_size`: the processor's crop (height, width)."""
    h, w = image_size
    width, projection = int(config.get("hidden_size", 768)), int(config.get("projection_dim", 512))
    return ComponentSpec(
        "image_encoder",
        inputs=(TensorSpec("pixel_values", ("B", 3, h, w), sample="image"),),
        outputs=(TensorSpec("image_embeds", ("B", projection)),),
        description=f"CLIP image encoder ({width} wide, {h}x{w} input): image -> projected image embedding ({projection})",
        weights="image_encoder",
        prefix="model.",
        load=lambda model_dir, allow_pickle: load(Path(model_dir) / "image_encoder", allow_pickle),
        trace_side=h,
    )


class ImageEncoder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).image_embeds


def load(folder: Path, allow_pickle: bool) -> nn.Module:
    from ...errors import require

    transformers = require("transformers", "export", "sdtrt export")
    return ImageEncoder(transformers.CLIPVisionModelWithProjection.from_pretrained(folder, use_safetensors=not allow_pickle).eval())
