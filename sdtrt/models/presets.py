"""Model presets: diffusers folders with the real architectures (or tiny ones) and random weights.

No model hub is reachable from where sdtrt is developed and tested, so presets are how models are
made: the architecture and configs of the real checkpoints, weights drawn from a seeded RNG, and the
real CLIP tokenizer vocabulary (which ships inside the `open_clip_torch` package).
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

from ..files import atomic_dir
from ..errors import SdtrtError, require

_SD_SCHEDULER = {  # the scheduler_config.json of the SD 1.x / 2.x base checkpoints
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
}

_SD_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
}

_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]


_SD_PIPELINE = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    config: dict[str, Any]  # transformers CLIPTextConfig (BertConfig for kind "bert")
    pad_token: str  # OpenAI CLIP (SD 1.x, SDXL's first) pads with <|endoftext|>; OpenCLIP (SD 2.x, SDXL's second) with "!" (id 0)
    projection: bool = False  # CLIPTextModelWithProjection: SDXL's second encoder, whose pooled output conditions the UNet
    kind: str = "clip"  # "bert": BertModel + BertTokenizer (Taiyi), vocab_size from the built vocabulary
    tokenizer: dict[str, Any] = dataclasses.field(default_factory=dict)  # BertTokenizer settings (tokenizer_config.json)


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    description: str
    pipeline_class: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: dict[str, TextEncoder]  # subfolder -> encoder ("text_encoder", "text_encoder_2")
    scheduler_class: str
    scheduler: dict[str, Any]
    pipeline: dict[str, Any] = dataclasses.field(default_factory=lambda: dict(_SD_PIPELINE))  # extra pipeline arguments
    # further pipeline parts: name -> (class, config), e.g. the upscaler's low_res_scheduler, a depth estimator and its
    # image processor, unCLIP's image encoder; built by `_build_extra` (random weights, seeded like the rest)
    extras: dict[str, tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)

    @property
    def default_size(self) -> int:
        """Pixels per side the model was trained at (latent sample_size times the VAE factor: 8, the x4 upscaler's 4)."""
        return int(self.unet["sample_size"]) * 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def pad_token(self) -> str:
        return next(iter(self.text_encoders.values())).pad_token


def _tiny_unet(**over: Any) -> dict[str, Any]:
    cfg = {
        "sample_size": 8,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }
    cfg.update(over)
    return cfg


# Four blocks keep the real VAE factor of 8 (pixels = 8 x latent) at a fraction of the size.
_TINY_VAE = {
    "block_out_channels": [16, 32, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}


def _tiny_text(hidden_act: str, layers: int = 3) -> dict[str, Any]:
    # vocab_size stays 49408 so that every id the real tokenizer produces is valid.
    return {
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": layers,
        "max_position_embeddings": 77,
        "projection_dim": 32,
        "hidden_act": hidden_act,
    }


_CLIP_L = {  # OpenAI CLIP ViT-L/14's text tower: SD 1.x, and SDXL's first encoder
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}

_CLIP_BIG_G = {  # OpenCLIP ViT-bigG/14's text tower: SDXL's second encoder (with its 1280 x 1280 projection)
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "max_position_embeddings": 77,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}

# IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-v0.1 text_encoder/config.json has the keys of a Chinese BERT-base
# (Taiyi-CLIP-RoBERTa-102M: 768 wide, 12 layers, 512 positions, WordPiece vocabulary of 21128); this is that
# config at toy size. Its tokenizer (BertTokenizer) lower-cases and pads prompts to model_max_length = 512.
_TINY_BERT = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "directionality": "bidi",
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 32,
    "initializer_range": 0.02,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "pooler_fc_size": 768,
    "pooler_num_attention_heads": 12,
    "pooler_num_fc_layers": 3,
    "pooler_size_per_head": 128,
    "pooler_type": "first_token_transform",
    "type_vocab_size": 2,
}
_TAIYI_TOKENIZER = {"do_lower_case": True, "model_max_length": 512, "tokenize_chinese_chars": True, "strip_accents": None}

# stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
_SDXL_SCHEDULER = {**_SD_SCHEDULER, "timestep_spacing": "leading", "interpolation_type": "linear", "use_karras_sigmas": False,
                   "sample_max_value": 1.0, "prediction_type": "epsilon"}
_SDXL_VAE = {"scaling_factor": 0.13025, "force_upcast": True}  # fp16 overflows: diffusers upcasts it


def _tiny_sdxl_unet(context: int, time_ids: int, **over: Any) -> dict[str, Any]:
    """SDXL's UNet shape (added text/time embeddings, linear projections, deeper transformers further
    down) at toy size; the added embedding takes `time_ids` x 8 time features + 32 pooled text."""
    cfg = {
        "sample_size": 8,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": [2, 4],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "transformer_layers_per_block": [1, 2],
        "projection_class_embeddings_input_dim": time_ids * 8 + 32,
        "cross_attention_dim": context,
        "norm_num_groups": 32,
    }
    cfg.update(over)
    return cfg


# stabilityai/stable-diffusion-x4-upscaler, reconstructed from its original config (Stability-AI/stablediffusion
# configs/stable-diffusion/x4-upscaling.yaml) the way diffusers' converter maps it: v-prediction on a 0.0001..0.02
# scaled-linear schedule (ldm's "linear"), the low-res image noised on the same schedule by a DDPMScheduler up to
# max_noise_level 350, its noise level fed to the UNet as a class label (num_classes 1000), latents scaled by 0.08333.
_X4_SCHEDULER = {**_SD_SCHEDULER, "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "v_prediction"}
_X4_LOW_RES_SCHEDULER = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                         "clip_sample": True, "variance_type": "fixed_small", "trained_betas": None}
_X4_PIPELINE = {"max_noise_level": 350, "safety_checker": None, "feature_extractor": None, "watermarker": None}
_OPEN_CLIP_H = {  # OpenCLIP ViT-H/14's text tower without its last layer (diffusers' SD 2.x text_encoder)
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "max_position_embeddings": 77,
    "projection_dim": 512,
    "hidden_act": "gelu",
}

# stabilityai/stable-diffusion-2-depth's feature_extractor/preprocessor_config.json (DPTImageProcessor, 384 x 384, bilinear,
# mean = std = 0.5), here at the toy depth estimator's 32 x 32; and a toy DPT (ViT, 8-pixel patches: a 64 x 64 depth map).
_DPT_PROCESSOR = {"do_resize": True, "size": {"height": 32, "width": 32}, "resample": 2, "keep_aspect_ratio": False,
                  "ensure_multiple_of": 1, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                  "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pad": False}
_TINY_DPT = {"image_size": 32, "patch_size": 8, "num_channels": 3, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
             "intermediate_size": 37, "backbone_out_indices": [0, 1, 2, 3], "neck_hidden_sizes": [8, 16, 32, 32],
             "fusion_hidden_size": 16, "is_hybrid": False,
             "initializer_range": 0.1}  # transformers' 0.02 makes the toy's depth ~1e-9 (ReLU head): 0.1 gives depth maps of ~1e-2

# diffusers' own test configuration for StableUnCLIPImg2ImgPipeline (a 32-wide CLIP image encoder, 4-pixel patches
# here), with stable-diffusion-2-1-unclip's squaredcos_cap_v2 image noising schedule and DDIM v-prediction sampler.
_TINY_CLIP_VISION = {"hidden_size": 32, "projection_dim": 32, "num_hidden_layers": 5, "num_attention_heads": 4, "image_size": 32,
                     "intermediate_size": 37, "patch_size": 4}
_CLIP_PROCESSOR_32 = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            name="tiny",
            description="SD1.x-shaped toy model (~3M parameters, 64x64 images): tests and the demo",
            pipeline_class="StableDiffusionPipeline",
            unet=_tiny_unet(),
            vae=_TINY_VAE,
            text_encoders={"text_encoder": TextEncoder(_tiny_text("quick_gelu"), "<|endoftext|>")},
            scheduler_class="PNDMScheduler",
            scheduler=_SD_SCHEDULER,
        ),
        Preset(
            name="tiny-sd2",
            description="SD2.x-shaped toy model: v-prediction, linear projections, '!' padding",
            pipeline_class="StableDiffusionPipeline",
            unet=_tiny_unet(use_linear_projection=True, attention_head_dim=[2, 4], upcast_attention=True),
            vae=_TINY_VAE,
            text_encoders={"text_encoder": TextEncoder(_tiny_text("gelu"), "!")},
            scheduler_class="DDIMScheduler",
            scheduler={**_SD_SCHEDULER, "prediction_type": "v_prediction"},
        ),
        Preset(
            name="tiny-inpaint",
            description="SD1.x-shaped toy inpainting model (9-channel UNet input)",
            pipeline_class="StableDiffusionInpaintPipeline",
            unet=_tiny_unet(in_channels=9),
            vae=_TINY_VAE,
            text_encoders={"text_encoder": TextEncoder(_tiny_text("quick_gelu"), "<|endoftext|>")},
            scheduler_class="PNDMScheduler",
            scheduler=_SD_SCHEDULER,
        ),
        Preset(
            name="tiny-taiyi",
            description="Taiyi-shaped toy model: SD1.x UNet/VAE, Chinese BERT text encoder + WordPiece tokenizer (512 tokens)",
            pipeline_class="StableDiffusionPipeline",
            unet=_tiny_unet(),
            vae=_TINY_VAE,
            text_encoders={"text_encoder": TextEncoder(_TINY_BERT, "[PAD]", kind="bert", tokenizer=_TAIYI_TOKENIZER)},
            scheduler_class="PNDMScheduler",
            scheduler=_SD_SCHEDULER,
        ),
        Preset(
            name="tiny-upscaler",
            description="x4-upscaler-shaped toy model: 7-channel UNet (latents + low-res image), noise-level class labels, 3-block VAE (x4)",
            pipeline_class="StableDiffusionUpscalePipeline",
            unet={"sample_size": 16, "in_channels": 7, "out_channels": 4, "block_out_channels": [32, 32, 64],
                  "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  "only_cross_attention": [True, True, False], "layers_per_block": 1, "cross_attention_dim": 32,
                  "attention_head_dim": 8, "use_linear_projection": True, "num_class_embeds": 1000, "norm_num_groups": 32},
            vae={"block_out_channels": [16, 32, 32], "down_block_types": ["DownEncoderBlock2D"] * 3,
                 "up_block_types": ["UpDecoderBlock2D"] * 3, "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 8,
                 "sample_size": 32, "scaling_factor": 0.08333},
            text_encoders={"text_encoder": TextEncoder(_tiny_text("gelu"), "!")},
            scheduler_class="DDIMScheduler",
            scheduler=_X4_SCHEDULER,
            pipeline=dict(_X4_PIPELINE),
            extras={"low_res_scheduler": ("DDPMScheduler", _X4_LOW_RES_SCHEDULER)},
        ),
        Preset(
            name="sd-x4-upscaler",
            description="Stable Diffusion x4 upscaler architecture (UNet 473.4M, OpenCLIP-H text encoder 340.4M, VAE 55.3M)",
            pipeline_class="StableDiffusionUpscalePipeline",
            unet={  # x4-upscaling.yaml's unet_config through diffusers' create_unet_diffusers_config
                "sample_size": 128, "in_channels": 7, "out_channels": 4, "block_out_channels": [256, 512, 512, 1024],
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "only_cross_attention": [True, True, True, False], "layers_per_block": 2, "cross_attention_dim": 1024,
                "attention_head_dim": 8, "use_linear_projection": True, "num_class_embeds": 1000, "norm_num_groups": 32,
            },
            vae={"block_out_channels": [128, 256, 512], "down_block_types": ["DownEncoderBlock2D"] * 3,
                 "up_block_types": ["UpDecoderBlock2D"] * 3, "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32,
                 "sample_size": 256, "scaling_factor": 0.08333},
            text_encoders={"text_encoder": TextEncoder(_OPEN_CLIP_H, "!")},
            scheduler_class="DDIMScheduler",
            scheduler=_X4_SCHEDULER,
            pipeline=dict(_X4_PIPELINE),
            extras={"low_res_scheduler": ("DDPMScheduler", _X4_LOW_RES_SCHEDULER)},
        ),
        Preset(
            name="tiny-depth2img",
            description="depth2img-shaped toy model: 5-channel UNet (latents + depth), SD2 text encoder, a toy DPT depth estimator",
            pipeline_class="StableDiffusionDepth2ImgPipeline",
            unet=_tiny_unet(in_channels=5, use_linear_projection=True, attention_head_dim=[2, 4]),
            vae=_TINY_VAE,
            text_encoders={"text_encoder": TextEncoder(_tiny_text("gelu"), "!")},
            scheduler_class="PNDMScheduler",
            scheduler=_SD_SCHEDULER,
            pipeline={},
            extras={"depth_estimator": ("DPTForDepthEstimation", _TINY_DPT), "feature_extractor": ("DPTImageProcessor", _DPT_PROCESSOR)},
        ),
        Preset(
            name="tiny-unclip",
            description="stable-unCLIP-shaped toy model: CLIP image encoder, embedding noise augmentation, UNet class conditioning",
            pipeline_class="StableUnCLIPImg2ImgPipeline",
            unet=_tiny_unet(class_embed_type="projection", projection_class_embeddings_input_dim=64, use_linear_projection=True,
                            attention_head_dim=[2, 4], upcast_attention=True),
            vae=_TINY_VAE,
            text_encoders={"text_encoder": TextEncoder(_tiny_text("gelu"), "!")},
            scheduler_class="DDIMScheduler",
            scheduler={**_SD_SCHEDULER, "prediction_type": "v_prediction"},
            pipeline={},
            extras={"image_encoder": ("CLIPVisionModelWithProjection", _TINY_CLIP_VISION),
                    "feature_extractor": ("CLIPImageProcessor", _CLIP_PROCESSOR_32),
                    "image_normalizer": ("StableUnCLIPImageNormalizer", {"embedding_dim": 32}),
                    "image_noising_scheduler": ("DDPMScheduler", {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000})},
        ),
        Preset(
            name="sd15",
            description="Stable Diffusion 1.5 architecture (UNet 859.5M, CLIP ViT-L text encoder 123.1M)",
            pipeline_class="StableDiffusionPipeline",
            unet={
                "sample_size": 64,
                "block_out_channels": [320, 640, 1280, 1280],
                "down_block_types": _SD_DOWN,
                "up_block_types": _SD_UP,
                "layers_per_block": 2,
                "cross_attention_dim": 768,
                "attention_head_dim": 8,
                "norm_num_groups": 32,
            },
            vae={**_SD_VAE, "sample_size": 512},
            text_encoders={"text_encoder": TextEncoder(_CLIP_L, "<|endoftext|>")},
            scheduler_class="PNDMScheduler",
            scheduler=_SD_SCHEDULER,
        ),
        Preset(
            name="sd21",
            description="Stable Diffusion 2.1 (768-v) architecture: OpenCLIP-H text encoder, v-prediction",
            pipeline_class="StableDiffusionPipeline",
            unet={
                "sample_size": 96,
                "block_out_channels": [320, 640, 1280, 1280],
                "down_block_types": _SD_DOWN,
                "up_block_types": _SD_UP,
                "layers_per_block": 2,
                "cross_attention_dim": 1024,
                "attention_head_dim": [5, 10, 20, 20],
                "use_linear_projection": True,
                "upcast_attention": True,
                "norm_num_groups": 32,
            },
            vae={**_SD_VAE, "sample_size": 768},
            text_encoders={"text_encoder": TextEncoder({
                "vocab_size": 49408,
                "hidden_size": 1024,
                "intermediate_size": 4096,
                "num_attention_heads": 16,
                "num_hidden_layers": 23,
                "max_position_embeddings": 77,
                "projection_dim": 512,
                "hidden_act": "gelu",
            }, "!")},
            scheduler_class="DDIMScheduler",
            scheduler={**_SD_SCHEDULER, "prediction_type": "v_prediction"},
        ),
        Preset(
            name="tiny-sdxl",
            description="SDXL-shaped toy model: two text encoders, pooled text + size/crop time ids (64x64 images)",
            pipeline_class="StableDiffusionXLPipeline",
            unet=_tiny_sdxl_unet(context=64, time_ids=6),
            vae={**_TINY_VAE, **_SDXL_VAE},
            text_encoders={"text_encoder": TextEncoder(_tiny_text("quick_gelu", layers=4), "<|endoftext|>"),
                           "text_encoder_2": TextEncoder(_tiny_text("gelu", layers=4), "!", projection=True)},
            scheduler_class="EulerDiscreteScheduler",
            scheduler=_SDXL_SCHEDULER,
            pipeline={"force_zeros_for_empty_prompt": True},
        ),
        Preset(
            name="tiny-sdxl-refiner",
            description="SDXL-refiner-shaped toy model: second text encoder only, aesthetic-score time ids",
            pipeline_class="StableDiffusionXLImg2ImgPipeline",
            unet=_tiny_sdxl_unet(context=32, time_ids=5),
            vae={**_TINY_VAE, **_SDXL_VAE},
            text_encoders={"text_encoder_2": TextEncoder(_tiny_text("gelu", layers=4), "!", projection=True)},
            scheduler_class="EulerDiscreteScheduler",
            scheduler=_SDXL_SCHEDULER,
            pipeline={"text_encoder": None, "tokenizer": None, "requires_aesthetics_score": True,
                      "force_zeros_for_empty_prompt": False},
        ),
        Preset(
            name="sdxl",
            description="SDXL base 1.0 architecture (UNet 2.57B, CLIP ViT-L + OpenCLIP bigG text encoders)",
            pipeline_class="StableDiffusionXLPipeline",
            unet={  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
                "sample_size": 128,
                "block_out_channels": [320, 640, 1280],
                "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                "layers_per_block": 2,
                "attention_head_dim": [5, 10, 20],
                "transformer_layers_per_block": [1, 2, 10],
                "use_linear_projection": True,
                "addition_embed_type": "text_time",
                "addition_embed_type_num_heads": 64,
                "addition_time_embed_dim": 256,
                "projection_class_embeddings_input_dim": 2816,
                "cross_attention_dim": 2048,
                "norm_num_groups": 32,
            },
            vae={**_SD_VAE, **_SDXL_VAE, "sample_size": 1024},
            text_encoders={"text_encoder": TextEncoder(_CLIP_L, "<|endoftext|>"),
                           "text_encoder_2": TextEncoder(_CLIP_BIG_G, "!", projection=True)},
            scheduler_class="EulerDiscreteScheduler",
            scheduler=_SDXL_SCHEDULER,
            pipeline={"force_zeros_for_empty_prompt": True},
        ),
    ]
}


@dataclasses.dataclass(frozen=True)
class ControlNetPreset:
    """A diffusers ControlNet folder for a base preset: the base UNet's encoder half (as ControlNetModel.from_unet
    makes it) with a conditioning-image embedding; random weights, zero convolutions included (a trained
    ControlNet's are not zero, and zero ones would make every test unable to fail)."""

    name: str
    description: str
    base: str

    pipeline_class = "ControlNetModel"

    @property
    def default_size(self) -> int:
        return PRESETS[self.base].default_size


CONTROLNET_PRESETS: dict[str, ControlNetPreset] = {
    p.name: p
    for p in [
        ControlNetPreset("tiny-controlnet", "ControlNet for tiny (and tiny-sd2 / tiny-inpaint): tests", "tiny"),
        ControlNetPreset("tiny-sdxl-controlnet", "ControlNet for tiny-sdxl: tests", "tiny-sdxl"),
        ControlNetPreset("sd15-controlnet", "ControlNet with the SD 1.5 architecture (361M): benchmarks", "sd15"),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise SdtrtError(f"unknown preset '{name}'.", f"choose one of: {', '.join([*PRESETS, *CONTROLNET_PRESETS])}",
                         cli_fix=f"pass --preset with one of: {', '.join([*PRESETS, *CONTROLNET_PRESETS])}") from None


# --- the CLIP tokenizer files --------------------------------------------------------------------


def clip_bpe_path() -> Path:
    """The CLIP BPE merges file that ships inside open_clip_torch (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SdtrtError(
            "the CLIP vocabulary comes from the open_clip_torch package, which is not installed.",
            "pip install --no-deps open_clip_torch",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise SdtrtError(f"{path} is missing from open_clip_torch.", "pip install --force-reinstall --no-deps open_clip_torch")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """The 49408-entry CLIP vocabulary and its 48894 merges, as OpenAI's CLIP builds them."""
    lines = gzip.open(clip_bpe_path(), "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # line 0 is a version header
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: Path, pad_token: str) -> None:
    """tokenizer/ as diffusers checkpoints have it, saved by transformers' own CLIPTokenizer."""
    transformers = require("transformers", "export", "make-model")
    vocab, merges = clip_vocab_and_merges()
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(str(folder))


# --- the Chinese WordPiece vocabulary (Taiyi's tokenizer) ---------------------------------------------

# Word pieces a prompt vocabulary has (bert-base-chinese keeps ~2,000 English words and pieces like these)
_ENGLISH_WORDS = (
    "the a an of and in on at with by for to from is are style art painting photo portrait landscape city night "
    "cat dog fox bird flower tree river mountain sea sky sun moon girl boy man woman house street car anime "
    "watercolor oil ink sketch digital high quality detailed realistic beautiful masterpiece best van gogh "
    "monet ukiyo cyberpunk fantasy 4k 8k hd uhd"
).split()
_ENGLISH_PIECES = "##s ##es ##ed ##ing ##er ##est ##ly ##ion ##tion ##al ##ic ##ful ##ness ##ment ##ist ##ous".split()


def _chars(*ranges: tuple[int, int]) -> list[str]:
    return [chr(c) for lo, hi in ranges for c in range(lo, hi + 1)]


def chinese_wordpiece_vocab() -> list[str]:
    """A vocabulary laid out like bert-base-chinese's vocab.txt (no Chinese vocabulary ships in any package
    reachable here, so it is built): [PAD], [unused1..99], [UNK] [CLS] [SEP] [MASK] <S> <T> (ids 0-105), then
    single characters - ASCII punctuation, digits and lower-case letters, Latin-1, Greek, Cyrillic, CJK and
    general punctuation, kana, Hangul jamo and syllables, full-width forms (lower-case), a few emoji - then
    every CJK Unified Ideograph U+4E00..U+9FFF, part of extensions A and B and the compatibility block,
    English words, and '##' continuations (of every character that can continue a word: letters, digits,
    kana, jamo, full-width forms, plus English suffixes). Ids differ from the real one; the structure
    (specials, unused rows, one token per CJK character, '##' pieces, [UNK] for the rest) is the same."""
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(1, 100)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<S>", "<T>"]
    ascii_chars = [c for c in _chars((0x21, 0x7E)) if not c.isupper()]
    latin = [c for c in _chars((0xA1, 0xFF)) if not c.isupper() and c != "\xad"]
    greek_cyrillic = _chars((0x3B1, 0x3C9), (0x430, 0x44F))
    punctuation = _chars((0x2013, 0x2014), (0x2018, 0x2019), (0x201C, 0x201D), (0x2026, 0x2026), (0x2027, 0x2027), (0x203B, 0x203B),
                         (0x3001, 0x3003), (0x3007, 0x3011), (0x3014, 0x3017), (0x30FB, 0x30FC))
    kana = _chars((0x3041, 0x3096), (0x30A1, 0x30FA))
    hangul = _chars((0x1100, 0x1112), (0x1161, 0x1175), (0x11A8, 0x11C2), (0x3131, 0x318E)) + list("한국어서울")
    fullwidth = [c for c in _chars((0xFF01, 0xFF5E)) if not c.isupper()]
    emoji = list("😀😂😊😍🔥👍❤🚀🌸🐱")
    cjk = _chars((0x4E00, 0x9FFF), (0x3400, 0x34FF), (0x20000, 0x200FF), (0xF900, 0xF9FF))
    singles = ascii_chars + latin + greek_cyrillic + punctuation + kana + hangul + fullwidth + emoji + cjk
    continuing = [c for c in ascii_chars + latin + greek_cyrillic + kana + hangul + fullwidth if c.isalnum()]
    pieces = ["##" + c for c in continuing]
    tokens += singles + [w for w in _ENGLISH_WORDS if w not in singles] + [p for p in _ENGLISH_PIECES if p not in pieces] + pieces
    assert len(tokens) == len(set(tokens)), "a vocabulary entry is repeated"
    return tokens


def write_bert_tokenizer(folder: Path, settings: dict[str, Any]) -> None:
    """tokenizer/ as Taiyi's checkpoint has it (vocab.txt, tokenizer_config.json, special_tokens_map.json),
    saved by transformers' own BertTokenizer."""
    transformers = require("transformers", "export", "make-model")
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(chinese_wordpiece_vocab()) + "\n", encoding="utf-8")
    tok = transformers.BertTokenizer(str(folder / "vocab.txt"), **settings)
    tok.save_pretrained(str(folder))


# --- building the folder -------------------------------------------------------------------------


def build_components(preset: Preset, seed: int, device: str = "cpu") -> dict[str, Any]:
    """Instantiate UNet, VAE, text encoder(s) and scheduler with seeded random weights."""
    import torch

    diffusers = require("diffusers", "export", "make-model")
    transformers = require("transformers", "export", "make-model")
    parts: dict[str, Any] = {}
    with torch.device(device):
        torch.manual_seed(seed)
        parts["unet"] = diffusers.UNet2DConditionModel(**preset.unet).eval()
        torch.manual_seed((seed + 1) % 2**64)
        parts["vae"] = diffusers.AutoencoderKL(**preset.vae).eval()
        for i, (name, enc) in enumerate(preset.text_encoders.items()):
            torch.manual_seed((seed + 2 + i) % 2**64)
            if enc.kind == "bert":
                config = transformers.BertConfig(**{**enc.config, "vocab_size": len(chinese_wordpiece_vocab())})
                parts[name] = transformers.BertModel(config).eval()
                continue
            cls = transformers.CLIPTextModelWithProjection if enc.projection else transformers.CLIPTextModel
            parts[name] = cls(transformers.CLIPTextConfig(**enc.config)).eval()
    # from_config keeps unknown keys in the saved config, as the real checkpoints have them
    parts["scheduler"] = getattr(diffusers, preset.scheduler_class).from_config(preset.scheduler)
    for i, (name, (cls, config)) in enumerate(preset.extras.items()):
        with torch.device(device):
            parts[name] = _build_extra(cls, config, (seed + 10 + i) % 2**64)
    return parts


def _build_extra(cls: str, config: dict[str, Any], seed: int) -> Any:
    """One of a preset's further parts: a diffusers scheduler, a transformers image processor or model (random
    weights), or unCLIP's image normalizer (random statistics: an identity normalizer would hide a missing one)."""
    import torch

    diffusers = require("diffusers", "export", "make-model")
    transformers = require("transformers", "export", "make-model")
    if cls.endswith("Scheduler"):
        return getattr(diffusers, cls).from_config(config)
    if cls.endswith("ImageProcessor"):
        return getattr(transformers, cls)(**config)
    torch.manual_seed(seed)
    if cls == "StableUnCLIPImageNormalizer":
        from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

        normalizer = StableUnCLIPImageNormalizer(**config)
        with torch.no_grad():
            normalizer.mean.normal_(0, 0.5)
            normalizer.std.uniform_(0.5, 1.5)
        return normalizer.eval()
    configs = {"DPTForDepthEstimation": transformers.DPTConfig, "CLIPVisionModelWithProjection": transformers.CLIPVisionConfig}
    return getattr(transformers, cls)(configs[cls](**config)).eval()


def make_controlnet(preset: ControlNetPreset, out: Path, seed: int = 0, force: bool = False) -> Path:
    import torch

    diffusers = require("diffusers", "export", "make-model")
    base = PRESETS[preset.base]
    with atomic_dir(Path(out), force) as tmp:
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(**base.unet)
        net = diffusers.ControlNetModel.from_unet(unet)
        torch.manual_seed((seed + 7) % 2**64)
        with torch.no_grad():
            for conv in [*net.controlnet_down_blocks, net.controlnet_mid_block]:
                conv.weight.normal_(0, 0.2)  # trained zero-convs are not zero: residuals must reach the UNet
                conv.bias.normal_(0, 0.01)
        net.eval().save_pretrained(str(tmp), safe_serialization=True)
    return Path(out)


def make_model(preset_name: str, out: Path, seed: int = 0, force: bool = False) -> Path:
    """Write a diffusers-format model folder for the preset (a ControlNet folder for a ControlNet preset); returns its path."""
    if preset_name in CONTROLNET_PRESETS:
        return make_controlnet(CONTROLNET_PRESETS[preset_name], out, seed, force)
    preset = get_preset(preset_name)
    diffusers = require("diffusers", "export", "make-model")
    transformers = require("transformers", "export", "make-model")
    if any(enc.kind == "clip" for enc in preset.text_encoders.values()):
        clip_bpe_path()  # fail before any slow work if the vocabulary is missing
    out = Path(out)
    with atomic_dir(out, force) as tmp:
        parts = build_components(preset, seed)
        for name, enc in preset.text_encoders.items():
            folder = name.replace("text_encoder", "tokenizer")
            if enc.kind == "bert":
                write_bert_tokenizer(tmp / folder, enc.tokenizer)
                parts[folder] = transformers.BertTokenizer.from_pretrained(str(tmp / folder))
                continue
            write_tokenizer(tmp / folder, enc.pad_token)
            parts[folder] = transformers.CLIPTokenizer.from_pretrained(str(tmp / folder))
        pipe = getattr(diffusers, preset.pipeline_class)(**parts, **preset.pipeline)
        pipe.save_pretrained(str(tmp), safe_serialization=True)
    return out
