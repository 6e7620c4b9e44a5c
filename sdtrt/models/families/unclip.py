"""Stable unCLIP image variations (StableUnCLIPImg2ImgPipeline; stabilityai/stable-diffusion-2-1-unclip).

An SD 2.x UNet conditioned, beside the text, on a CLIP image embedding through its class embedding
(class_embed_type "projection"). What diffusers does, and so what sdtrt does:

* the image is prepared by transformers' CLIPImageProcessor (reproduced in torch: runtime/image_processors.py)
  and encoded by the CLIP image encoder (exported as the component `image_encoder`) to its projected embedding;
* noise augmentation (`noise_image_embeddings`): the embedding is normalized by the checkpoint's CLIP statistics
  (`image_normalizer` mean and std, kept in sdtrt.json), noised on `image_noising_scheduler`'s DDPM schedule at
  `noise_level` (default 0) with noise drawn from the generator after the prompt and before the latents,
  un-normalized, and the sinusoidal embedding of the noise level (flip_sin_to_cos, no shift) appended: the class
  label is [B2, 2 x embedding width];
* one image serves every prompt and image; a list gives one image per prompt, repeated per image; with guidance
  the unconditional rows are zeros (the noise-level half too), as diffusers makes them;
* the start latents are txt2img's (`image` is not a start image); defaults: guidance 10, noise level 0 (and
  diffusers' 20 steps: sdtrt's default is 50 for every family); the prompt may be "" (diffusers' default).

The image is read as 8-bit RGB, as a PIL image reaches the processor; tensors are converted to 8 bits first
(diffusers takes a tensor as already processed pixel values instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ...errors import SdtrtError
from ...runtime.conditioning import ImageInputs, ddpm_noised, noise_like, timestep_embedding
from ..components import clip_text, clip_vision, unet, vae
from ..spec import ComponentSpec
from .base import Config, LeaveOut, read_json
from .conditioned import ImageConditioned, image_count


class UnCLIP(ImageConditioned):
    name = "unclip"
    title = "Stable unCLIP image variations"
    pipeline_classes = ("StableUnCLIPImg2ImgPipeline",)
    image_fields = ("noise_level",)
    image_parameter = "the image to make variations of"
    DEFAULTS = {"variation": {"guidance_scale": 10.0, "noise_level": 0}}

    def mode(self, request) -> str:
        return "variation"

    def defaults(self, mode: str, controlnet: bool = False) -> dict[str, float]:
        return dict(self.DEFAULTS["variation"])

    # --- export time -------------------------------------------------------------------------------

    def read_config(self, folder: Path, index: Mapping[str, Any]) -> dict[str, Any]:
        config = super().read_config(folder, index)
        encoder = read_json(folder / "image_encoder" / "config.json")
        u = config["unet"]
        width = int(encoder.get("projection_dim", 512))
        if u.get("class_embed_type") != "projection" or int(u.get("projection_class_embeddings_input_dim") or 0) != 2 * width:
            raise SdtrtError(f"{folder}'s UNet takes class labels of {u.get('projection_class_embeddings_input_dim')} "
                             f"({u.get('class_embed_type')!r}); an unCLIP UNet takes the image embedding and its noise level, "
                             f"2 x {width} through a 'projection' class embedding.",
                             "use a stable unCLIP folder (stabilityai/stable-diffusion-2-1-unclip), or fix model_index.json")
        config["image_encoder"] = encoder
        config["feature_extractor"] = read_json(folder / "feature_extractor" / "preprocessor_config.json")
        config["image_normalizer"] = _normalizer(folder / "image_normalizer", width)
        config["image_noising_scheduler"] = self.scheduler_config(folder, "image_noising_scheduler")
        return config

    def weight_folders(self, config: Config) -> tuple[str, ...]:
        return (*super().weight_folders(config), "image_normalizer")

    def own_components(self, config: Config) -> dict[str, ComponentSpec]:
        from ...runtime.image_processors import clip_size

        return {
            "text_encoder": clip_text.spec("text_encoder", config["text_encoder"]),
            "unet": unet.spec(config["unet"]),
            "vae_decoder": vae.decoder_spec(config["vae"]),
            "image_encoder": clip_vision.spec(config["image_encoder"], clip_size(config["feature_extractor"])),
        }

    def default_components(self, config: Config) -> tuple[str, ...]:
        return ("text_encoder", "unet", "vae_decoder", "image_encoder")

    def describe(self, config: Config) -> str:
        e = config["image_encoder"]
        return f"{self.title} (CLIP image encoder {e.get('hidden_size')} wide, {e.get('projection_dim')}-d embedding)"

    # --- run time --------------------------------------------------------------------------------

    def check_request(self, r, config: Config) -> None:
        super().check_request(r, config)
        self.needs_image(r, "photo.png")
        if r.strength is not None:
            raise LeaveOut("strength", r.strength, "is not used by unCLIP (the image conditions the UNet; noise_level sets how loosely)")
        top = int(config["image_noising_scheduler"].get("num_train_timesteps", 1000)) - 1
        if r.noise_level > top:
            from ...runtime.request import InvalidRequest

            raise InvalidRequest("noise_level", r.noise_level, f"is above the image noising schedule's last step {top}", 0,
                                 "more noise: looser variations")

    def image_inputs(self, r, config: Config) -> "ImageEmbedding":
        from ...runtime.image_processors import pil_list

        pils = pil_list(r.image, "the image")
        image_count(r, len(pils), "image")
        return ImageEmbedding(pils, config)


def _normalizer(folder: Path, width: int) -> dict[str, list[float]]:
    """StableUnCLIPImageNormalizer's mean and std (its only weights), read once at export."""
    from ...errors import require

    path = folder / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        raise SdtrtError(f"{folder} has no diffusion_pytorch_model.safetensors (the image embedding statistics).",
                         "re-save the pipeline with safetensors (save_pretrained(dir, safe_serialization=True))")
    require("safetensors", "export", "sdtrt export")
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    stats = {k: tensors[k].float().reshape(-1) for k in ("mean", "std") if k in tensors}
    if len(stats) != 2 or any(v.numel() != width for v in stats.values()):
        raise SdtrtError(f"{path} does not hold a mean and std of {width} values.", "restore image_normalizer/ from the original checkpoint")
    return {k: v.tolist() for k, v in stats.items()}


class ImageEmbedding(ImageInputs):
    """unCLIP's class label: the noised image embedding and the noise level's sinusoidal embedding."""

    def __init__(self, pils: list, config: Config):
        super().__init__(starts_from_image=False)
        self.pils, self.config = pils, config

    def make(self, nets, r, generator):
        from ...runtime.image_processors import clip_pixels

        if not nets.has("image_encoder"):
            raise SdtrtError("this export has no image encoder, which unCLIP needs.", "re-export with the image_encoder component (the default)",
                             cli_fix="re-export with --components including image_encoder (the default)")
        embeds = nets.run("image_encoder", {"pixel_values": clip_pixels(self.pils, self.config["feature_extractor"])})["image_embeds"]
        stats = self.config["image_normalizer"]
        mean = torch.tensor(stats["mean"], dtype=torch.float32, device=embeds.device)[None]
        std = torch.tensor(stats["std"], dtype=torch.float32, device=embeds.device)[None]
        noise = noise_like(tuple(embeds.shape), generator, nets.device)
        noised = ddpm_noised(self.config["image_noising_scheduler"], (embeds - mean) * 1.0 / std, noise, r.noise_level) * std + mean
        levels = torch.full((embeds.shape[0],), r.noise_level, dtype=torch.long, device=embeds.device)
        label = torch.cat([noised, timestep_embedding(levels, embeds.shape[-1])], dim=1)
        label = label.repeat_interleave(r.batch // label.shape[0], dim=0)  # one image for all, or one per prompt x its images
        return {"class_labels": torch.cat([torch.zeros_like(label), label]) if r.cfg else label}, []
