"""UNet inputs a family makes from the request's images, beside the text: the x4 upscaler's noised low-res
image and noise level, depth2img's depth map, unCLIP's noised image embedding.

A family that conditions on images returns an `ImageInputs` from `Family.image_inputs(request, config)`
(its images already loaded and checked). The pipeline then

1. asks `starts_from_image` (is `image` also the img2img start, as in depth2img, or only conditioning?) and
   `size` (the output (height, width) the images imply, e.g. 4x the upscaler's input) while it resolves sizes;
2. after the text conditioning and before the start latents, calls `make(nets, request, generator)`, which
   returns UNet inputs that stay fixed over the loop (batched like the text: [uncond; cond] with guidance)
   and step hooks (channels concatenated to the sample). Noise is drawn there, from the request's generator,
   at the point diffusers' pipelines draw it: after the prompt, before the latents.

The helpers below are the pieces these families share, each as diffusers computes it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Protocol

import torch

from .denoise import StepHook
from .noise import Generator, randn


class Networks(Protocol):
    """What `ImageInputs.make` may call: exported components by name (inputs cast to what the backend wants,
    outputs float32 on the pipeline's device)."""

    device: torch.device

    def run(self, component: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def has(self, component: str) -> bool: ...


@dataclasses.dataclass
class ImageInputs:
    starts_from_image: bool = False  # `image` is also the img2img start (depth2img), not only conditioning
    size: tuple[int, int] | None = None  # output (height, width) the images imply, or None

    def make(self, nets: Networks, request, generator: Generator) -> tuple[dict[str, torch.Tensor], list[StepHook]]:
        """(fixed UNet inputs, step hooks) for this request."""
        raise NotImplementedError


class ExtraChannels(StepHook):
    """Channels concatenated after the scaled latents on every step, as diffusers' pipelines do it
    (`torch.cat([scale_model_input(latents), extra], dim=1)`): the inpainting UNet's mask and masked-image latents,
    the upscaler's low-res image, depth2img's depth."""

    def __init__(self, extra: torch.Tensor):
        self.extra = extra

    def unet_inputs(self, step, feeds) -> None:
        feeds["sample"] = torch.cat([feeds["sample"], self.extra.to(feeds["sample"].dtype)], dim=1)


def generators_for(generator: Generator, rows: int) -> Generator:
    """The generators diffusers' randn_tensor uses for a tensor of `rows` rows: a list is read from its start,
    one per row (so a list of one per image serves a tensor with fewer rows, as in diffusers)."""
    if isinstance(generator, (list, tuple)) and len(generator) > 1:
        return list(generator[:rows])
    return generator


def noise_like(shape, generator: Generator, device) -> torch.Tensor:
    return randn(shape, generators_for(generator, shape[0]), device, torch.float32)


def ddpm_noised(scheduler_config: Mapping[str, Any], x: torch.Tensor, noise: torch.Tensor, level: int) -> torch.Tensor:
    """DDPMScheduler.add_noise(x, noise, level): sqrt(a) x + sqrt(1 - a) noise with a = alphas_cumprod[level] of
    the schedule in `scheduler_config` (the upscaler's low_res_scheduler, unCLIP's image_noising_scheduler)."""
    from .schedulers.common import BaseConfig, alphas_cumprod, config_from, noised_by_alpha

    cfg = config_from(BaseConfig, scheduler_config, {}, str(scheduler_config.get("_class_name", "DDPMScheduler")))
    alpha_bar = alphas_cumprod(cfg)[int(level)].to(device=x.device, dtype=x.dtype)
    return noised_by_alpha(alpha_bar, x, noise)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """diffusers' get_timestep_embedding(timesteps, dim, flip_sin_to_cos=True, downscale_freq_shift=0):
    [cos | sin] of t * exp(-ln(max_period) * i / (dim/2)), i < dim/2 (zero-padded to an odd dim)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return torch.nn.functional.pad(emb, (0, 1, 0, 0)) if dim % 2 else emb


def for_guidance(x: torch.Tensor, cfg: bool, uncond: torch.Tensor | None = None) -> torch.Tensor:
    """[uncond; cond] rows with guidance on (uncond defaults to the same rows), the rows alone without."""
    if not cfg:
        return x
    return torch.cat([x if uncond is None else uncond, x])
