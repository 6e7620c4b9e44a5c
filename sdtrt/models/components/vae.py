"""diffusers' AutoencoderKL, split into the two networks the runtime calls separately.

vae_decoder: latent [B,L,h,w] (already unscaled by the runtime) -> images [B,3,H,W] in about [-1,1]
             (H = f·h: f = 8 for SD/SDXL VAEs, 4 for the x4 upscaler's; `latent_factor`)
vae_encoder: images [B,3,H,W] in [-1,1] -> latent_mean, latent_std [B,L,h,w] (before scaling)

The encoder returns mean and std, and the runtime draws the sample itself, so the generator is
consumed exactly where diffusers consumes it. VAEs overflow in fp16 (NaN / black images), so they
stay fp32 unless the user asks otherwise (--fp16-vae).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..spec import VAE_FACTOR, ComponentSpec, TensorSpec


def latent_factor(config: Mapping[str, Any]) -> int:
    """Pixels per latent cell, as diffusers' pipelines compute vae_scale_factor: 2^(down blocks - 1)
    (8 for every SD/SDXL VAE, 4 for the x4 upscaler's three-block VAE)."""
    blocks = config.get("block_out_channels")
    return 2 ** (len(blocks) - 1) if blocks else VAE_FACTOR


def decoder_spec(config: Mapping[str, Any]) -> ComponentSpec:
    c = int(config.get("latent_channels", 4))
    return ComponentSpec(
        "vae_decoder",
        inputs=(TensorSpec("latent", ("B", c, "h", "w")),),
        outputs=(TensorSpec("images", ("B", 3, "H", "W")),),
        description="VAE decoder: unscaled latents -> images in [-1, 1]",
        weights="vae",
        prefix="vae.",
        load=lambda model_dir, allow_pickle: VaeDecoder(load(Path(model_dir), allow_pickle)),
        fp16=False,
        latent_factor=latent_factor(config),
    )


def encoder_spec(config: Mapping[str, Any]) -> ComponentSpec:
    c = int(config.get("latent_channels", 4))
    return ComponentSpec(
        "vae_encoder",
        inputs=(TensorSpec("images", ("B", 3, "H", "W"), sample="image"),),
        outputs=(TensorSpec("latent_mean", ("B", c, "h", "w")), TensorSpec("latent_std", ("B", c, "h", "w"))),
        description="VAE encoder: images in [-1, 1] -> latent distribution (mean, std), before scaling",
        weights="vae",
        prefix="vae.",
        load=lambda model_dir, allow_pickle: VaeEncoder(load(Path(model_dir), allow_pickle)),
        fp16=False,
        latent_factor=latent_factor(config),
    )


class VaeDecoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoder(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(images, return_dict=False)[0]
        return dist.mean, dist.std


def load(model_dir: Path, allow_pickle: bool) -> nn.Module:
    from ...errors import require

    diffusers = require("diffusers", "export", "sdtrt export")
    return diffusers.AutoencoderKL.from_pretrained(model_dir, subfolder="vae", use_safetensors=not allow_pickle).eval()
