"""Stable Diffusion depth2img (StableDiffusionDepth2ImgPipeline; stabilityai/stable-diffusion-2-depth).

img2img whose UNet also sees a depth map: 5 input channels, the scaled latents then the depth. What diffusers
does, and so what sdtrt does:

* the start is SD's img2img (VAE posterior sample, noised to the strength's first timestep; default strength
  0.8, guidance 7.5);
* the depth map is the user's (`depth_map`: [H,W] / [B,H,W], or a grayscale image) or the depth estimator's
  (a DPT, exported as the component `depth_estimator`) on the image as transformers' DPTImageProcessor prepares
  it (reproduced in torch: runtime/image_processors.py); either way it is resized to the latent size (bicubic,
  align_corners=False), scaled per image to [-1, 1] by its minimum and maximum, repeated over the batch
  (tiled, as diffusers repeats it) and doubled for guidance, then concatenated after the latents every step.
  DPT predicts relative inverse depth, so larger values are nearer; a user's map must follow that.

Auto depth reads the image as 8-bit RGB (a PIL image or file, as diffusers hands it to the feature extractor;
tensors are converted to 8 bits first - diffusers would feed them to the processor as floats instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ...errors import SdtrtError
from ...runtime.conditioning import ExtraChannels, ImageInputs, for_guidance
from ..components import clip_text, dpt, unet, vae
from ..spec import ComponentSpec
from .base import Config, read_json
from .conditioned import ImageConditioned, image_count


class Depth2Img(ImageConditioned):
    name = "depth"
    title = "Stable Diffusion depth2img"
    pipeline_classes = ("StableDiffusionDepth2ImgPipeline",)
    image_fields = ("depth_map",)
    image_parameter = "an image to repaint with its depth kept"

    # --- export time -------------------------------------------------------------------------------

    def read_config(self, folder: Path, index: Mapping[str, Any]) -> dict[str, Any]:
        from ...runtime.image_processors import check_dpt_config, dpt_size

        config = super().read_config(folder, index)
        u, v = config["unet"], config["vae"]
        latent = int(v.get("latent_channels", 4))
        if int(u.get("in_channels", 4)) != latent + 1:
            raise SdtrtError(f"{folder}'s UNet takes {u.get('in_channels')} channels; a depth2img UNet takes {latent + 1} "
                             "(latents + depth).", "use a depth2img folder (stabilityai/stable-diffusion-2-depth), or fix model_index.json")
        estimator = read_json(folder / "depth_estimator" / "config.json")
        if estimator.get("model_type") != "dpt":
            raise SdtrtError(f"{folder}/depth_estimator is a {estimator.get('model_type')!r} model, not DPT.",
                             "use the DPTForDepthEstimation the checkpoint ships with")
        processor = read_json(folder / "feature_extractor" / "preprocessor_config.json")
        check_dpt_config(processor, f"{folder}/feature_extractor")
        dpt.output_size(estimator, *dpt_size(processor))  # refuses backbones sdtrt does not know, before any work
        config["depth_estimator"], config["feature_extractor"] = estimator, processor
        return config

    def own_components(self, config: Config) -> dict[str, ComponentSpec]:
        from ...runtime.image_processors import dpt_size

        return {
            "text_encoder": clip_text.spec("text_encoder", config["text_encoder"]),
            "unet": unet.spec(config["unet"]),
            "vae_decoder": vae.decoder_spec(config["vae"]),
            "vae_encoder": vae.encoder_spec(config["vae"]),
            "depth_estimator": dpt.spec(config["depth_estimator"], dpt_size(config["feature_extractor"])),
        }

    def default_components(self, config: Config) -> tuple[str, ...]:
        return ("text_encoder", "unet", "vae_decoder", "vae_encoder", "depth_estimator")

    def required_components(self, request, config: Config) -> tuple[str, ...]:
        needed = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
        return needed if request.depth_map is not None else (*needed, "depth_estimator")

    def describe(self, config: Config) -> str:
        kind = "DPT-Hybrid" if config["depth_estimator"].get("is_hybrid") else "DPT"
        return f"{self.title} ({kind} depth estimator)"

    # --- run time --------------------------------------------------------------------------------

    def check_request(self, r, config: Config) -> None:
        super().check_request(r, config)
        self.needs_image(r, "photo.png")

    def image_inputs(self, r, config: Config) -> "Depth":
        from ...runtime.image_processors import pil_list

        factor = self.latent_factor(config)
        if r.depth_map is not None:
            return Depth(_depth_tensor(r.depth_map), None, config["feature_extractor"], factor)
        pils = pil_list(r.image, "the image")
        image_count(r, len(pils), "image")
        return Depth(None, pils, config["feature_extractor"], factor)


def _depth_tensor(depth) -> torch.Tensor:
    """A user's depth map -> float32 [B,H,W]: a tensor [H,W] / [B,H,W] / [B,1,H,W], or an image (file or PIL, any
    grayscale or RGB mode: read as one float channel)."""
    from PIL import Image

    if isinstance(depth, (str, Path, Image.Image)):
        try:
            pil = Image.open(depth) if not isinstance(depth, Image.Image) else depth
            gray = pil.convert("F") if pil.mode not in ("RGB", "RGBA") else pil.convert("L").convert("F")
        except (OSError, ValueError) as e:
            raise SdtrtError(f"cannot read the depth map {depth}: {e}.", "pass a grayscale PNG (8 or 16 bit) or a tensor",
                             cli_fix="pass --depth-map a grayscale PNG (8 or 16 bit)") from None
        w, h = gray.size
        d = torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.float32).reshape(1, h, w)
    elif isinstance(depth, torch.Tensor):
        d = depth.detach().float()
        d = d[None] if d.dim() == 2 else d[:, 0] if d.dim() == 4 and d.shape[1] == 1 else d
        if d.dim() != 3:
            raise SdtrtError(f"the depth map tensor has shape {tuple(depth.shape)}.", "pass [H,W] or [B,H,W] (one map per image)")
    else:
        raise SdtrtError(f"cannot use {type(depth).__name__} as a depth map.", "pass a tensor [H,W] / [B,H,W] or a grayscale image")
    flat = d.flatten(1)
    if not bool(torch.isfinite(d).all()) or bool((flat.amax(1) == flat.amin(1)).any()):
        raise SdtrtError("the depth map is constant or not finite: it has no depth to keep (diffusers would divide by zero).",
                         "pass a depth map whose values vary (larger = nearer), or leave it out to estimate one",
                         cli_fix="pass a --depth-map whose values vary (larger = nearer), or drop it to estimate one")
    return d


class Depth(ImageInputs):
    """depth2img's fifth UNet channel: the depth map at latent size, in [-1, 1]."""

    def __init__(self, depth: torch.Tensor | None, pils: list | None, processor: Mapping[str, Any], latent_factor: int):
        super().__init__(starts_from_image=True)
        self.depth, self.pils, self.processor, self.factor = depth, pils, processor, latent_factor

    def make(self, nets, r, generator):
        from ...runtime.image_processors import dpt_pixels

        depth = self.depth
        if depth is None:
            if not nets.has("depth_estimator"):
                raise SdtrtError("this export has no depth estimator, so the depth cannot be estimated.",
                                 "pass depth_map=, or re-export with the depth_estimator component (the default)",
                                 cli_fix="pass --depth-map FILE, or re-export with --components including depth_estimator (the default)")
            depth = nets.run("depth_estimator", {"pixel_values": dpt_pixels(self.pils, self.processor)})["predicted_depth"]
        depth = depth.to(nets.device, torch.float32)
        if depth.shape[0] not in (1, r.batch) and r.batch % depth.shape[0]:
            raise SdtrtError(f"{depth.shape[0]} depth maps for {r.batch} images.", "pass one depth map, or one per image")
        small = torch.nn.functional.interpolate(depth[:, None], size=(r.height // self.factor, r.width // self.factor), mode="bicubic",
                                                align_corners=False)
        low, high = small.amin(dim=[1, 2, 3], keepdim=True), small.amax(dim=[1, 2, 3], keepdim=True)
        small = 2.0 * (small - low) / (high - low) - 1.0
        if small.shape[0] < r.batch:
            small = small.repeat(r.batch // small.shape[0], 1, 1, 1)  # diffusers tiles the maps over the batch
        return {}, [ExtraChannels(for_guidance(small, r.cfg))]
