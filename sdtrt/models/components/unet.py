"""diffusers' UNet2DConditionModel, classifier-free guidance batched as [uncond; cond].

sample [B2,Cin,h,w], timestep float32 [1], encoder_hidden_states [B2,S,D]
  (+ class_labels when the config has a class embedding: int32 [B2] for `num_class_embeds` (the x4
     upscaler's noise level), float [B2,P] for class_embed_type "projection" (unCLIP's noised image embedding))
  (+ SDXL's added conditions: text_embeds [B2,P] pooled text, time_ids [B2,N] size/crop/aesthetic ids)
-> latent [B2,Cout,h,w]

Cin counts every channel the UNet takes: latents plus what a family concatenates at run time (the inpainting
mask and masked-image latents, the upscaler's low-res image, depth2img's depth map).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..spec import VAE_FACTOR, ComponentSpec, TensorSpec


def class_labels(config: Mapping[str, Any]) -> TensorSpec | None:
    """The class-label input a UNet config implies, or None: diffusers' UNet2DConditionModel embeds integer
    labels with `num_class_embeds` (nn.Embedding) and float vectors with class_embed_type "projection"."""
    kind = config.get("class_embed_type")
    if kind is None and config.get("num_class_embeds") is not None:
        return TensorSpec("class_labels", ("B2",), "int32", sample="class_labels")
    if kind == "projection":
        return TensorSpec("class_labels", ("B2", int(config["projection_class_embeddings_input_dim"])))
    if kind is not None:
        from ...errors import SdtrtError

        raise SdtrtError(f"the UNet's class_embed_type {kind!r} is not supported (sdtrt knows num_class_embeds and 'projection').",
                         "export a model whose UNet uses one of those")
    return None


def spec(config: Mapping[str, Any], *, pooled_dim: int | None = None, time_ids: tuple[float, ...] = (),
         controlnet: bool = False, latent_factor: int = VAE_FACTOR) -> ComponentSpec:
    """`config` is unet/config.json; SDXL passes its pooled width and the sample time ids (whose
    count, 6 or 5 with an aesthetic score, the UNet's added embedding fixes). With `controlnet`, the UNet
    also takes one residual per skip connection and one for its mid block (zeros when no ControlNet runs).
    `latent_factor`: pixels per latent cell of the model's VAE (8; the x4 upscaler's 4)."""
    inputs = [
        TensorSpec("sample", ("B2", int(config.get("in_channels", 4)), "h", "w")),
        TensorSpec("timestep", (1,), "float32", sample="timestep"),
        TensorSpec("encoder_hidden_states", ("B2", "S", int(config["cross_attention_dim"]))),
    ]
    labels = class_labels(config)
    sample_values: dict[str, tuple[float, ...]] = {}
    if labels is not None:
        inputs.append(labels)
        if labels.dtype == "int32":  # a valid label: the x4 upscaler's default noise level (20), within the table
            sample_values["class_labels"] = (min(20, int(config["num_class_embeds"]) - 1),)
    added = pooled_dim is not None
    if added:
        inputs += [TensorSpec("text_embeds", ("B2", pooled_dim)), TensorSpec("time_ids", ("B2", len(time_ids)), sample="time_ids")]
    if controlnet:
        from .controlnet import residuals

        inputs += list(residuals(config))
    out_channels = int(config.get("out_channels", 4))
    return ComponentSpec(
        "unet",
        inputs=tuple(inputs),
        outputs=(TensorSpec("latent", ("B2", out_channels, "h", "w")),),
        description="denoising UNet, classifier-free guidance batched as [uncond; cond]" + (" (+ pooled text and time ids)" if added else ""),
        weights="unet",
        prefix="unet.",
        load=lambda model_dir, allow_pickle: load(Path(model_dir), allow_pickle, added, controlnet, labels is not None),
        trace_side=trace_side(config, latent_factor),
        sample_values={**sample_values, **({"time_ids": tuple(time_ids)} if added else {})},
        latent_factor=latent_factor,
    )


def trace_side(config: Mapping[str, Any], latent_factor: int = VAE_FACTOR) -> int:
    """Image side (px) to trace at: latents of 2^(levels-1) + 1, deliberately not a multiple of the
    UNet's total down-sampling. diffusers then upsamples to each skip connection's exact size (a
    Resize whose size comes from the graph) instead of by a fixed x2, so the exported UNet takes
    every multiple of 8 px, as diffusers does, not only multiples of 64."""
    levels = len(config.get("block_out_channels", [0, 0, 0, 0]))
    return latent_factor * (2 ** (levels - 1) + 1)


class UNet(nn.Module):
    def __init__(self, unet: nn.Module, added: bool, controlnet: bool = False, labels: bool = False):
        super().__init__()
        self.unet, self.added, self.controlnet, self.labels = unet, added, controlnet, labels

    def forward(self, sample, timestep, encoder_hidden_states, *rest) -> torch.Tensor:
        extra = {}
        if self.labels:
            labels, *rest = rest
            # int32 in the contract (TensorRT prefers it); nn.Embedding wants int64
            extra["class_labels"] = labels.long() if not labels.is_floating_point() else labels
        if self.added:
            text_embeds, time_ids, *rest = rest
            extra["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": time_ids}
        if self.controlnet:
            *down, mid = rest
            extra["down_block_additional_residuals"], extra["mid_block_additional_residual"] = tuple(down), mid
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False, **extra)[0]


def load(model_dir: Path, allow_pickle: bool, added: bool, controlnet: bool = False, labels: bool = False) -> nn.Module:
    from ...errors import require

    diffusers = require("diffusers", "export", "sdtrt export")
    unet = diffusers.UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", use_safetensors=not allow_pickle).eval()
    return UNet(unet, added, controlnet, labels)
