"""Taiyi: Chinese Stable Diffusion (IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-v0.1 and folders like it).

An SD 1.x UNet and VAE whose text encoder is a Chinese BERT (`BertModel`, 768 wide in the real model) with
its WordPiece `BertTokenizer`. The folder is a plain StableDiffusionPipeline folder - diffusers runs it with
the same pipeline classes as SD - so the family is told apart by the text encoder model_index.json names.

What diffusers does with it, and so what sdtrt does:
* prompts are tokenized with padding="max_length", max_length=tokenizer.model_max_length (512), truncation:
  [CLS] up to 510 ids [SEP] [PAD]...; the UNet's text axis is therefore 512 tokens, not CLIP's 77 - every
  spec's text axis is fixed to the tokenizer's length here;
* the UNet gets the BERT's last hidden state (`text_encoder(ids, attention_mask)[0]`); the attention mask
  only when the text encoder config sets use_attention_mask (see components/bert_text.py);
* guidance, negative prompts, img2img and inpainting are SD's (the same pipelines).

Refused, with the reason: clip_skip (diffusers' clip_skip reads CLIP's final layer norm, which BERT has not;
diffusers itself fails on it) and the A1111 prompt syntax (its 75-token chunks and weights are defined on
CLIP's 77-token window; Taiyi's window is 512 tokens and diffusers truncates there).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from ...errors import SdtrtError
from ...runtime.request import InvalidRequest
from ..components import bert_text, unet, vae
from ..spec import ComponentSpec
from .base import Config, LeaveOut as _LeaveOut, read_json, text_encoder_class
from .sd import StableDiffusion

BERT_CLASSES = ("BertModel",)


class Taiyi(StableDiffusion):
    name = "taiyi"
    title = "Taiyi (Chinese Stable Diffusion: SD 1.x with a BERT text encoder)"

    def matches(self, index: Mapping[str, Any]) -> bool:
        return str(index.get("_class_name", "")) in self.pipeline_classes and text_encoder_class(index) in BERT_CLASSES

    def read_config(self, folder: Path, index: Mapping[str, Any]) -> dict[str, Any]:
        from ...runtime.text.wordpiece import VOCAB_FILE, WordPieceTokenizer

        unet_cfg = read_json(folder / "unet" / "config.json")
        text = read_json(folder / "text_encoder" / "config.json")
        if unet_cfg.get("addition_embed_type"):
            raise SdtrtError(f"{folder} names a BERT text encoder but its UNet takes SDXL's added conditioning.",
                             "use a Taiyi (SD 1.x) folder, or fix model_index.json")
        if text.get("model_type", "bert") != "bert":
            raise SdtrtError(f"{folder}'s model_index.json says BertModel but text_encoder/config.json is a {text.get('model_type')}.",
                             "restore text_encoder/ from the original checkpoint")
        tokenizer_dir = folder / self.tokenizer_folder("text_encoder")
        if not (tokenizer_dir / VOCAB_FILE).is_file():
            raise SdtrtError(f"{tokenizer_dir} lacks {VOCAB_FILE} (the BERT WordPiece vocabulary).",
                             "copy tokenizer/ (vocab.txt, tokenizer_config.json) from the original checkpoint")
        tokenizer_config = read_json(tokenizer_dir / "tokenizer_config.json")
        length = tokenizer_config.get("model_max_length")
        positions = int(text.get("max_position_embeddings", 512))
        if not isinstance(length, int) or not 2 < length <= positions:
            raise SdtrtError(f"{tokenizer_dir}/tokenizer_config.json has model_max_length {length!r}; diffusers pads every prompt to it, "
                             f"so it must be a number of tokens the text encoder can take (3..{positions}).",
                             f'set "model_max_length": {positions} as in the original checkpoint')
        tok = WordPieceTokenizer.from_dir(tokenizer_dir)
        if int(unet_cfg["cross_attention_dim"]) != int(text["hidden_size"]):
            raise SdtrtError(f"{folder}'s UNet attends to {unet_cfg['cross_attention_dim']}-wide text but its BERT is "
                             f"{text['hidden_size']} wide.", "use the text encoder the UNet was trained with")
        return {"unet": unet_cfg, "vae": read_json(folder / "vae" / "config.json"), "text_encoder": text,
                "tokenizer": {"model_max_length": length, "pad_token_id": tok.pad_id}}

    def text_length(self, config: Config) -> int:
        return int(config["tokenizer"]["model_max_length"])

    def components(self, config: Config) -> dict[str, ComponentSpec]:
        """SD's networks, each with its text axis fixed to the tokenizer's length (the UNet's and any ControlNet's)."""
        length = self.text_length(config)
        return {name: _with_text_length(spec, length) for name, spec in super().components(config).items()}

    def own_components(self, config: Config) -> dict[str, ComponentSpec]:
        return {
            "text_encoder": bert_text.spec("text_encoder", config["text_encoder"], config["tokenizer"]),
            "unet": unet.spec(config["unet"], controlnet=bool(config.get("controlnets"))),
            "vae_decoder": vae.decoder_spec(config["vae"]),
            "vae_encoder": vae.encoder_spec(config["vae"]),
        }

    def describe(self, config: Config) -> str:
        return f"Taiyi (SD 1.x, {config['text_encoder']['hidden_size']}-wide BERT text encoder, {self.text_length(config)} tokens)"

    def clip_skip_max(self, config: Config) -> int:
        return 0  # no CLIP layers to skip

    def check_request(self, request, config: Config) -> None:
        super().check_request(request, config)
        if request.clip_skip is not None:
            raise _LeaveOut("clip_skip", request.clip_skip,
                            "is not defined for Taiyi's BERT text encoder (clip_skip skips CLIP layers before CLIP's final "
                            "layer norm; diffusers fails on it too)")
        if request.prompt_syntax == "a1111":
            raise InvalidRequest("prompt_syntax", request.prompt_syntax,
                                 f"is for CLIP's 77-token window; Taiyi's WordPiece tokenizer reads {self.text_length(config) - 2} "
                                 "tokens per prompt and diffusers gives (word:1.2) and [word] no meaning there", "plain",
                                 "brackets are then plain text, as in diffusers")


def _with_text_length(spec: ComponentSpec, length: int) -> ComponentSpec:
    """The spec with its per-call text axis S fixed to `length` (no prompt chunks: one window per prompt)."""
    inputs = tuple(dataclasses.replace(t, dims=tuple(length if d == "S" else d for d in t.dims)) for t in spec.inputs)
    return spec if inputs == spec.inputs else dataclasses.replace(spec, inputs=inputs)
