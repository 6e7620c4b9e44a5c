"""Start latents for txt2img, img2img and inpainting, drawn from the generator in exactly the order
diffusers' pipelines draw them, and the inpainting step hooks.

- txt2img: noise * init_noise_sigma.
- img2img: VAE posterior sample (mean + std * noise) scaled, repeated per image, then noised to the
  start of the shortened schedule. Latents passed as the image (a base model's hand-off to a
  refiner) are used as they are.
- inpainting: image latents (when needed), start noise, then the masked image's latents; a
  9-channel UNet gets [mask, masked-image latents] as extra channels each step, a standard UNet
  has the known area blended back after each step.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .conditioning import ExtraChannels
from .denoise import StepHook
from .noise import randn
from .schedulers import Scheduler

EncodeImages = Callable[[torch.Tensor, object], torch.Tensor]  # (images in [-1,1], generator) -> scaled latents


def repeat_to(x: torch.Tensor, batch: int) -> torch.Tensor:
    return x.repeat(batch // x.shape[0], *([1] * (x.dim() - 1))) if x.shape[0] < batch else x


def txt2img(shape: tuple[int, ...], scheduler: Scheduler, generator, device) -> torch.Tensor:
    return randn(shape, generator, device, torch.float32) * scheduler.init_noise_sigma


def img2img(start: torch.Tensor, shape: tuple[int, ...], scheduler: Scheduler, generator, device, add_noise: bool = True) -> torch.Tensor:
    """`start`: scaled latents of the image(s); noised to the current schedule position unless a
    refiner continues a base model's latents (add_noise=False, diffusers' denoising_start)."""
    start = repeat_to(start, shape[0])
    if not add_noise:
        return start
    return scheduler.add_noise(start, randn(shape, generator, device, torch.float32))


@dataclasses.dataclass
class Inpaint:
    latents: torch.Tensor  # start latents
    hook: StepHook


def inpaint(image: torch.Tensor, mask: torch.Tensor, shape: tuple[int, ...], scheduler: Scheduler, generator, device,
            encode: EncodeImages, strength: float, cfg: bool, nine_channel: bool) -> Inpaint:
    """`image` [1|B,3,H,W] in [-1,1]; `mask` [1|B,1,H,W] of 0/1 (1 = repaint)."""
    batch = shape[0]
    full = strength == 1.0
    image_latents = None
    if not nine_channel or not full:
        image_latents = repeat_to(encode(image, generator), batch)
    noise = randn(shape, generator, device, torch.float32)
    latents = noise * scheduler.init_noise_sigma if full else scheduler.add_noise(image_latents, noise)
    masked_latents = repeat_to(encode(image * (mask < 0.5), generator), batch)
    small_mask = repeat_to(torch.nn.functional.interpolate(mask, size=shape[2:]).to(device), batch)
    if nine_channel:
        extra = torch.cat([small_mask, masked_latents], dim=1)
        return Inpaint(latents, NineChannelHook(torch.cat([extra, extra]) if cfg else extra))
    return Inpaint(latents, BlendHook(small_mask, image_latents, noise, scheduler))


class NineChannelHook(ExtraChannels):
    """An inpainting UNet sees [latents, mask, masked-image latents] as its input channels."""


class BlendHook(StepHook):
    """A standard UNet inpaints by keeping the unmasked area on the image's own trajectory,
    noised to the next step's level, after every step."""

    def __init__(self, mask: torch.Tensor, image_latents: torch.Tensor, noise: torch.Tensor, scheduler: Scheduler):
        self.mask, self.image_latents, self.noise, self.scheduler = mask, image_latents, noise, scheduler

    def after_step(self, step, latents: torch.Tensor) -> torch.Tensor:
        known = self.image_latents
        if not step.last:
            known = self.scheduler.add_noise(known, self.noise)
        return (1 - self.mask) * known + self.mask * latents
