"""The Stable Diffusion x4 upscaler (StableDiffusionUpscalePipeline; stabilityai/stable-diffusion-x4-upscaler).

A latent diffusion model whose latents have the low-res image's own size: its VAE has three blocks, so one
latent cell is 4x4 output pixels (`latent_factor` 4) and the output is 4x the input. What diffusers does, and
so what sdtrt does:

* the low-res image (PIL: floored to a multiple of 4 with a bicubic resize, VaeImageProcessor(resample=
  "bicubic"); then /255, 2x - 1) is noised on its own DDPM schedule (`low_res_scheduler`) at `noise_level`
  (default 20, at most the pipeline's `max_noise_level`, 350), with noise drawn from the generator after the
  prompt is encoded and before the start latents;
* every step the UNet sees 7 channels: the scaled latents, then the noised image (`torch.cat(dim=1)`), and
  the noise level as its class label (an nn.Embedding of `num_class_embeds` rows);
* the noised images are batched `cat([image] * (2 if guidance else 1) * num_images_per_prompt)` - all of
  them, then all again - while prompts are repeated per image: with several prompts *and* several images per
  prompt, prompt 0's second image is conditioned on image 1 (diffusers' own pairing, kept for parity);
* latents are `randn * init_noise_sigma` of the low-res size; the decoder divides by the VAE's scaling
  factor, which the pipeline forces to 0.08333 whatever vae/config.json says (so does sdtrt);
* defaults: guidance 9.0, noise_level 20 (diffusers' upscaler default is also 75 steps; sdtrt's is 50 for
  every family: pass steps=75 for diffusers' default).

One image serves every prompt (diffusers needs the list written out; the result equals that list). Height and
width are the image's business (refused). Large images: the UNet runs on the whole low-res image (no latent
tiling, as in diffusers); the VAE decoder, which works at 4x the size, runs in tiles with `vae_tiling`, exactly
as `pipe.vae.enable_tiling()` does in diffusers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ...errors import SdtrtError
from ...runtime.conditioning import ExtraChannels, ImageInputs, ddpm_noised, for_guidance, noise_like
from ..components import clip_text, unet, vae
from ..spec import ComponentSpec
from .base import Config, LeaveOut
from .conditioned import ImageConditioned, image_count

SCALING_FACTOR = 0.08333  # StableDiffusionUpscalePipeline.__init__ sets it on any VAE that says otherwise
RESAMPLE = "bicubic"  # VaeImageProcessor(vae_scale_factor, resample="bicubic") in the upscaler


class Upscaler(ImageConditioned):
    name = "upscale"
    title = "Stable Diffusion x4 upscaler"
    pipeline_classes = ("StableDiffusionUpscalePipeline",)
    image_fields = ("noise_level",)
    image_parameter = "the low-res image to upscale"
    DEFAULTS = {"upscale": {"guidance_scale": 9.0, "noise_level": 20}}

    def mode(self, request) -> str:
        return "upscale"

    def defaults(self, mode: str, controlnet: bool = False) -> dict[str, float]:
        return dict(self.DEFAULTS["upscale"])

    # --- export time -------------------------------------------------------------------------------

    def read_config(self, folder: Path, index: Mapping[str, Any]) -> dict[str, Any]:
        config = super().read_config(folder, index)
        u, v = config["unet"], config["vae"]
        latent = int(v.get("latent_channels", 4))
        if int(u.get("in_channels", 4)) != latent + 3 or u.get("num_class_embeds") is None:
            raise SdtrtError(f"{folder}'s UNet takes {u.get('in_channels')} channels and num_class_embeds={u.get('num_class_embeds')}; "
                             f"an x4 upscaler's takes {latent + 3} (latents + the RGB low-res image) and a noise-level class label.",
                             "use an x4 upscaler folder (stabilityai/stable-diffusion-x4-upscaler), or fix model_index.json's _class_name")
        config["vae"] = {**v, "scaling_factor": SCALING_FACTOR}
        config["low_res_scheduler"] = self.scheduler_config(folder, "low_res_scheduler")
        config["pipeline"] = {"max_noise_level": int(index.get("max_noise_level", 350))}
        return config

    def own_components(self, config: Config) -> dict[str, ComponentSpec]:
        return {
            "text_encoder": clip_text.spec("text_encoder", config["text_encoder"]),
            "unet": unet.spec(config["unet"], latent_factor=self.latent_factor(config)),
            "vae_decoder": vae.decoder_spec(config["vae"]),
        }

    def describe(self, config: Config) -> str:
        return f"{self.title} (x{self.latent_factor(config)}, noise levels up to {config['pipeline']['max_noise_level']})"

    # --- run time --------------------------------------------------------------------------------

    def check_request(self, r, config: Config) -> None:
        super().check_request(r, config)
        self.needs_image(r, "low_res.png")
        for name in ("height", "width"):
            if getattr(r, name) is not None:
                raise LeaveOut(name, getattr(r, name), f"is set by the image: the output is {self.latent_factor(config)}x the low-res image "
                                                       "(resize the input instead)")
        if r.strength is not None:
            raise LeaveOut("strength", r.strength, "is not used by the upscaler (noise_level sets how much of the input is kept)")
        top = config["pipeline"]["max_noise_level"]
        if r.noise_level > top:
            from ...runtime.request import InvalidRequest

            raise InvalidRequest("noise_level", r.noise_level, f"is above this model's max_noise_level {top}", 20,
                                 "more noise: more invented detail, less of the input")

    def image_inputs(self, r, config: Config) -> "LowRes":
        from ...runtime.image_processors import batch_size, pil_list, pixels

        factor = self.latent_factor(config)
        if isinstance(r.image, torch.Tensor):
            x = r.image[None] if r.image.dim() == 3 else r.image
            if x.dim() != 4 or x.shape[1] != 3:
                raise SdtrtError(f"image tensor has shape {tuple(r.image.shape)}.", "pass [3,H,W] or [B,3,H,W] with values in [0, 1], or a PIL image")
            h, w = x.shape[2] - x.shape[2] % factor, x.shape[3] - x.shape[3] % factor
            if (h, w) != tuple(x.shape[2:]):
                if not r.resize:
                    raise SdtrtError(f"the low-res image is {x.shape[3]}x{x.shape[2]}, not a multiple of {factor} in each side.",
                                     f"crop it to {w}x{h}, or pass resize=True to scale it there",
                                     cli_fix=f"crop it to {w}x{h}, or pass --resize to scale it there")
                x = torch.nn.functional.interpolate(x.float(), size=(h, w))  # VaeImageProcessor.resize on tensors: nearest
            images = 2.0 * x.float() - 1.0
        else:
            pils = pil_list(r.image, "the low-res image")
            h, w = batch_size(pils, factor, r.resize, "the low-res image", "--image")
            images = pixels(pils, h, w, RESAMPLE)
        image_count(r, images.shape[0], "low-res image")
        return LowRes(size=(h * factor, w * factor), images=images, schedule=config["low_res_scheduler"])


class LowRes(ImageInputs):
    """The noised low-res image (channels 5-7 of every UNet input) and its noise level (the class label)."""

    def __init__(self, size: tuple[int, int], images: torch.Tensor, schedule: Mapping[str, Any]):
        super().__init__(starts_from_image=False, size=size)
        self.images, self.schedule = images, schedule

    def make(self, nets, r, generator):
        x = self.images.to(nets.device)
        if x.shape[0] < len(r.prompts):
            x = x.repeat(len(r.prompts), 1, 1, 1)  # one image for every prompt: as if the list were written out
        noise = noise_like(tuple(x.shape), generator, nets.device)
        x = ddpm_noised(self.schedule, x, noise, r.noise_level)
        x = torch.cat([x] * r.num_images_per_prompt)  # diffusers' order: every image, then every image again
        x = for_guidance(x, r.cfg)
        labels = torch.full((x.shape[0],), r.noise_level, dtype=torch.int32, device=nets.device)
        return {"class_labels": labels}, [ExtraChannels(x)]
