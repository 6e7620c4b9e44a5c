"""transformers' DPTForDepthEstimation: depth2img's depth estimator (DPT-Hybrid MiDaS in stabilityai/stable-diffusion-2-depth).

pixel_values [B,3,Hd,Wd] (DPTImageProcessor's output: a fixed size, normalized) -> predicted_depth [B,Ho,Wo]
(relative inverse depth: larger is nearer). Hd, Wd come from the model's feature_extractor config, so the graph
is static in its image size; the runtime reproduces the processor (runtime/image_processors.py: dpt_pixels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ...errors import SdtrtError
from ..spec import ComponentSpec, TensorSpec


def output_size(config: Mapping[str, Any], height: int, width: int) -> tuple[int, int]:
    """The depth map's size for an input of height x width. DPT reassembles the ViT's patch grid at
    `reassemble_factors` (x4 at most by default), fuses (x2) and upsamples in its head (x2): grid x 4 x max factor.
    DPT-Hybrid takes its finest features from the BiT backbone at stride 4: the output has the input's size."""
    if config.get("is_hybrid"):
        return height, width
    if config.get("backbone_config") or config.get("backbone"):
        raise SdtrtError(f"the depth estimator uses a {config.get('backbone') or 'separate'} backbone; sdtrt knows DPT (ViT) and DPT-Hybrid.",
                         "use a DPTForDepthEstimation with a ViT or hybrid backbone (as stable-diffusion-2-depth has), or pass depth maps yourself")
    patch = int(config.get("patch_size", 16))
    scale = 4 * max(float(f) for f in config.get("reassemble_factors", (4, 2, 1, 0.5)))
    return int(height // patch * scale), int(width // patch * scale)


def spec(config: Mapping[str, Any], image_size: tuple[int, int]) -> ComponentSpec:
    """`config`: depth_estimator/config.json; `image_size`: the (height, width) its image processor resizes to."""
    h, w = image_size
    oh, ow = output_size(config, h, w)
    return ComponentSpec(
        "depth_estimator",
        inputs=(TensorSpec("pixel_values", ("B", 3, h, w), sample="image"),),
        outputs=(TensorSpec("predicted_depth", ("B", oh, ow)),),
        description=f"DPT depth estimator ({'hybrid' if config.get('is_hybrid') else 'ViT'}, {h}x{w} input): image -> relative inverse depth",
        weights="depth_estimator",
        prefix="model.",
        load=lambda model_dir, allow_pickle: load(Path(model_dir) / "depth_estimator", allow_pickle),
        fp16=False,  # DPT-Hybrid's batch norms: diffusers runs it under autocast; sdtrt keeps it fp32 unless --fp16-vae
        trace_side=h,
    )


class DepthEstimator(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values).predicted_depth


def load(folder: Path, allow_pickle: bool) -> nn.Module:
    from ...errors import require

    transformers = require("transformers", "export", "sdtrt export")
    return DepthEstimator(transformers.DPTForDepthEstimation.from_pretrained(folder, use_safetensors=not allow_pickle).eval())
