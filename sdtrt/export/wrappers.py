"""One torch module per exported component, with exactly the ONNX contract's inputs and outputs."""

from __future__ import annotations

import torch
from torch import nn


class TextEncoder(nn.Module):
    """input_ids int32 [B,77] -> text_embeddings [B,77,D], skipped_embeddings [B,K,77,D]."""

    def __init__(self, clip_text_model: nn.Module, clip_skip_max: int):
        super().__init__()
        self.model = clip_text_model
        self.clip_skip_max = clip_skip_max

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # int32 in the contract (TensorRT prefers it); CLIP's embedding lookup wants int64.
        out = self.model(input_ids.long(), output_hidden_states=True)
        norm = self.model.text_model.final_layer_norm
        # diffusers' clip_skip=k: hidden_states[-(k+1)] through the final layer norm.
        skipped = [norm(out.hidden_states[-(k + 1)]) for k in range(1, self.clip_skip_max + 1)]
        return out.last_hidden_state, torch.stack(skipped, dim=1)


class UNet(nn.Module):
    """sample [B2,Cin,h,w], timestep [1] float32, encoder_hidden_states [B2,S,D] -> latent [B2,4,h,w]."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VaeDecoder(nn.Module):
    """latent [B,4,h,w] (already divided by scaling_factor) -> images [B,3,8h,8w] in about [-1,1]."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


class VaeEncoder(nn.Module):
    """images [B,3,H,W] in [-1,1] -> latent_mean, latent_std [B,4,H/8,W/8] (not yet scaled).

    The runtime draws the sample itself (mean + std * noise) so that the generator is consumed
    exactly where diffusers consumes it.
    """

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(images, return_dict=False)[0]
        return dist.mean, dist.std


def clip_skip_max(text_config: dict) -> int:
    """How many clip-skip depths to export: 1 and 2 cover common use, if the encoder has the layers."""
    return max(1, min(2, int(text_config["num_hidden_layers"]) - 1))


def wrap(component: str, modules: dict[str, nn.Module], text_config: dict) -> nn.Module:
    if component == "text_encoder":
        return TextEncoder(modules["text_encoder"], clip_skip_max(text_config))
    if component == "unet":
        return UNet(modules["unet"])
    if component == "vae_decoder":
        return VaeDecoder(modules["vae"])
    if component == "vae_encoder":
        return VaeEncoder(modules["vae"])
    raise KeyError(component)
