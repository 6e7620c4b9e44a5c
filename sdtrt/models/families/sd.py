"""Stable Diffusion 1.x and 2.x (StableDiffusionPipeline, and its img2img and inpainting folders).

One CLIP text encoder (OpenAI ViT-L for 1.x, OpenCLIP ViT-H for 2.x); the UNet is conditioned on its
last hidden state (through the final layer norm) alone. 2.x differs only in data: v-prediction in
the scheduler config, exact GELU, and the tokenizer's "!" padding. Inpainting folders have a
9-channel UNet (latents + mask + masked-image latents).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ...errors import SdtrtError
from ...runtime.text.encode import embed
from ..components import clip_text, unet, vae
from ..spec import ComponentSpec
from .base import Config, Family, read_json, text_encoder_class


class StableDiffusion(Family):
    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
    text_encoders = ("text_encoder",)

    def matches(self, index: Mapping[str, Any]) -> bool:
        return super().matches(index) and text_encoder_class(index) != "BertModel"  # BERT: the Taiyi family

    def read_config(self, folder: Path, index: Mapping[str, Any]) -> dict[str, Any]:
        unet_cfg = read_json(folder / "unet" / "config.json")
        text = read_json(folder / "text_encoder" / "config.json")
        if unet_cfg.get("addition_embed_type"):
            raise SdtrtError(f"{folder} says {index.get('_class_name')} but its UNet takes SDXL's added conditioning.",
                             "fix model_index.json's _class_name (StableDiffusionXLPipeline for an SDXL folder)")
        if text.get("model_type", "clip_text_model") != "clip_text_model":
            raise SdtrtError(f"{folder}'s text encoder is {text.get('model_type')}, not a CLIP text model; "
                             f"sdtrt's {self.title} family needs CLIP.", "export a model with a CLIP text encoder")
        return {"unet": unet_cfg, "vae": read_json(folder / "vae" / "config.json"), "text_encoder": text}

    def own_components(self, config: Config) -> dict[str, ComponentSpec]:
        return {
            "text_encoder": clip_text.spec("text_encoder", config["text_encoder"]),
            "unet": unet.spec(config["unet"], controlnet=bool(config.get("controlnets"))),
            "vae_decoder": vae.decoder_spec(config["vae"]),
            "vae_encoder": vae.encoder_spec(config["vae"]),
        }

    def describe(self, config: Config) -> str:
        # OpenAI CLIP (1.x) uses quick_gelu; OpenCLIP (2.x) exact gelu
        version = "2.x" if config["text_encoder"].get("hidden_act") == "gelu" else "1.x"
        return f"Stable Diffusion {version}"

    def check_request(self, request, config: Config) -> None:
        from ...runtime.request import InvalidRequest

        for name in ("prompt_2", "negative_prompt_2", "original_size", "target_size", "negative_original_size",
                     "negative_target_size", "denoising_start", "denoising_end"):
            if getattr(request, name) is not None:
                raise InvalidRequest(name, getattr(request, name), f"is an SDXL parameter; this is a {self.describe(config)} model", None)

    def conditioning(self, text, request, config: Config) -> dict[str, torch.Tensor]:
        prompts = request.prompts
        negatives = (request.negatives or [""] * len(prompts)) if request.cfg else []
        z, _ = embed(text, "text_encoder", prompts + negatives, request.prompt_syntax, request.clip_skip, len(prompts))
        n = request.num_images_per_prompt
        cond = z[: len(prompts)].repeat_interleave(n, dim=0)
        if not request.cfg:
            return {"encoder_hidden_states": cond}
        # diffusers applies clip_skip to the prompt only, never to the negative prompt; so does embed()
        return {"encoder_hidden_states": torch.cat([z[len(prompts):].repeat_interleave(n, dim=0), cond])}
