"""Stable Diffusion XL (StableDiffusionXLPipeline, and its img2img / inpainting folders; the refiner).

Two CLIP text encoders, run on the same prompt (or `prompt` and `prompt_2`): OpenAI ViT-L and
OpenCLIP bigG. The UNet's context is both encoders' penultimate hidden states concatenated
(768 + 1280 = 2048 wide); it is also conditioned, through an added embedding, on the second
encoder's pooled projection and on "time ids": (original size, crop top-left, target size), or for
the refiner (original size, crop top-left, aesthetic score). The refiner has the second encoder only.

`force_zeros_for_empty_prompt`: with no negative prompt at all, the unconditional embeddings are
zeros, not the embeddings of "". The time ids, their negative counterparts and their batch order
follow diffusers' pipelines exactly, quirks included (see `time_ids`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ...errors import SdtrtError
from ...runtime.text.encode import embed
from ..components import clip_text, unet, vae
from ..spec import ComponentSpec
from .base import Config, Family, read_json


class StableDiffusionXL(Family):
    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")
    text_encoders = ("text_encoder", "text_encoder_2")
    DEFAULTS = {"txt2img": {"guidance_scale": 5.0}, "img2img": {"guidance_scale": 5.0, "strength": 0.3},
                "inpaint": {"guidance_scale": 7.5, "strength": 0.9999}}
    CONTROLNET_DEFAULTS = {"txt2img": {"controlnet_conditioning_scale": 1.0},
                           "img2img": {"controlnet_conditioning_scale": 0.8, "strength": 0.8},
                           "inpaint": {"controlnet_conditioning_scale": 1.0, "guidance_scale": 5.0}}

    def read_config(self, folder: Path, index: Mapping[str, Any]) -> dict[str, Any]:
        config: dict[str, Any] = {"unet": read_json(folder / "unet" / "config.json"), "vae": read_json(folder / "vae" / "config.json")}
        for encoder in self.text_encoders:
            if index.get(encoder) and index[encoder][0] is not None:  # model_index lists [library, class] or [null, null]
                config[encoder] = read_json(folder / encoder / "config.json")
        if "text_encoder_2" not in config:
            raise SdtrtError(f"{folder} has no text_encoder_2; every SDXL model (base and refiner) has one.",
                             "use a complete SDXL folder (text_encoder_2/ and tokenizer_2/)")
        config["pipeline"] = {"force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
                              "requires_aesthetics_score": bool(index.get("requires_aesthetics_score", False))}
        u = config["unet"]
        if u.get("addition_embed_type") != "text_time":
            raise SdtrtError(f"{folder}'s UNet has no SDXL added conditioning (addition_embed_type {u.get('addition_embed_type')!r}).",
                             "fix model_index.json's _class_name (StableDiffusionPipeline for an SD 1.x/2.x folder)")
        expected = 5 if config["pipeline"]["requires_aesthetics_score"] else 6
        if self.time_id_count(config) != expected:
            raise SdtrtError(f"{folder}'s UNet takes {self.time_id_count(config)} time ids, but requires_aesthetics_score="
                             f"{config['pipeline']['requires_aesthetics_score']} means {expected}.",
                             "fix requires_aesthetics_score in model_index.json (true for a refiner)")
        return config

    @staticmethod
    def pooled_dim(config: Config) -> int:
        return int(config["text_encoder_2"]["projection_dim"])

    def time_id_count(self, config: Config) -> int:
        u = config["unet"]
        return (int(u["projection_class_embeddings_input_dim"]) - self.pooled_dim(config)) // int(u["addition_time_embed_dim"])

    def added_conditions(self, config: Config) -> dict[str, Any]:
        h, w = self.default_size(config)
        sample_ids = (h, w, 0, 0, 6.0) if self.time_id_count(config) == 5 else (h, w, 0, 0, h, w)
        return {"pooled_dim": self.pooled_dim(config), "time_ids": sample_ids}

    def own_components(self, config: Config) -> dict[str, ComponentSpec]:
        specs = {e: clip_text.spec(e, config[e], penultimate=True, pooled=e == "text_encoder_2") for e in self.present_text_encoders(config)}
        specs["unet"] = unet.spec(config["unet"], controlnet=bool(config.get("controlnets")), **self.added_conditions(config))
        specs["vae_decoder"] = vae.decoder_spec(config["vae"])
        specs["vae_encoder"] = vae.encoder_spec(config["vae"])
        return specs

    def describe(self, config: Config) -> str:
        return "SDXL refiner" if config["pipeline"]["requires_aesthetics_score"] else "SDXL base"

    # --- run time -----------------------------------------------------------------------------

    def conditioning(self, text, r, config: Config) -> dict[str, torch.Tensor]:
        encoders = self.present_text_encoders(config)
        b, n = len(r.prompts), r.num_images_per_prompt
        # diffusers pairs [prompt, prompt_2] with its encoders in order: a refiner's only encoder gets `prompt`
        prompts = [r.prompts, r.prompts_2][: len(encoders)]
        negatives_1 = r.negatives or [""] * b
        negatives = [negatives_1, r.negatives_2 or negatives_1][: len(encoders)]
        zeros = r.cfg and r.negative_prompt is None and config["pipeline"]["force_zeros_for_empty_prompt"]
        parts, pooled = [], None
        for encoder, texts, negs in zip(encoders, prompts, negatives):
            rows = texts + (negs if r.cfg and not zeros else [])
            z, p = embed(text, encoder, rows, r.prompt_syntax, r.clip_skip, skip_rows=b)
            parts.append(z)
            pooled = p if p is not None else pooled
        z = torch.cat(parts, dim=-1)
        cond, cond_pooled = z[:b].repeat_interleave(n, dim=0), pooled[:b].repeat_interleave(n, dim=0)
        ids_pos, ids_neg, interleaved = self.time_ids(r, config)
        if not r.cfg:
            return {"encoder_hidden_states": cond, "text_embeds": cond_pooled, "time_ids": ids_pos.repeat(b * n, 1)}
        if zeros:
            uncond, uncond_pooled = torch.zeros_like(cond), torch.zeros_like(cond_pooled)
        else:
            uncond, uncond_pooled = z[b:].repeat_interleave(n, dim=0), pooled[b:].repeat_interleave(n, dim=0)
        if interleaved:  # StableDiffusionXLPipeline: cat([neg, pos]).repeat(images) -> rows n, p, n, p, ...
            ids = torch.cat([ids_neg, ids_pos]).repeat(b * n, 1)
        else:  # the img2img / inpainting pipelines: all negatives, then all positives
            ids = torch.cat([ids_neg.repeat(b * n, 1), ids_pos.repeat(b * n, 1)])
        return {"encoder_hidden_states": torch.cat([uncond, cond]), "text_embeds": torch.cat([uncond_pooled, cond_pooled]),
                "time_ids": ids}

    def time_ids(self, r, config: Config) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(positive [1,N], negative [1,N], interleaved batch order) as the matching diffusers pipeline
        builds them. txt2img (StableDiffusionXLPipeline): negative ids only when both negative sizes are
        given. img2img / inpainting / refiner: negative sizes default to the positive ones, and, without
        an aesthetic score, the negative ids use the positive crop (diffusers' own behaviour)."""
        size = (r.height, r.width)
        original, target, crops = tuple(r.original_size or size), tuple(r.target_size or size), tuple(r.crops_coords_top_left)
        neg_crops = tuple(r.negative_crops_coords_top_left)
        if config["pipeline"]["requires_aesthetics_score"]:
            pos = original + crops + (r.aesthetic_score,)
            neg = tuple(r.negative_original_size or original) + neg_crops + (r.negative_aesthetic_score,)
            interleaved = False
        elif r.image is not None:
            pos = original + crops + target
            neg = tuple(r.negative_original_size or original) + crops + tuple(r.negative_target_size or target)
            interleaved = False
        else:
            pos = original + crops + target
            both = r.negative_original_size is not None and r.negative_target_size is not None
            neg = tuple(r.negative_original_size) + neg_crops + tuple(r.negative_target_size) if both else pos
            interleaved = True
        return torch.tensor([pos], dtype=torch.float32), torch.tensor([neg], dtype=torch.float32), interleaved

    def check_request(self, r, config: Config) -> None:
        from ...runtime.request import InvalidRequest

        if r.denoising_start is not None and r.image is None:
            raise InvalidRequest("denoising_start", r.denoising_start, "needs image= (a base model's latents or a picture)", None)
