"""CLIP text encoders (transformers' CLIPTextModel / CLIPTextModelWithProjection).

Per token row: input_ids int32 [T,77] ->
  text_embeddings    [T,77,D]    what the UNet gets by default
  skipped_embeddings [T,K,77,D]  row k-1 is diffusers' clip_skip=k
  pooled_embeddings  [T,P]       (SDXL's second encoder) the projected pooled output

Which hidden state is "default" is the family's choice, mirrored from its diffusers pipeline:
SD 1.x/2.x take the last layer through the final layer norm, and clip_skip=k the state k layers
earlier through that norm; SDXL takes the penultimate layer without the norm, and clip_skip=k the
state k layers before that.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..spec import TEXT_LENGTH, ComponentSpec, TensorSpec


def clip_skip_max(config: Mapping[str, Any], penultimate: bool) -> int:
    """How many clip-skip depths to export: 1 and 2 cover common use, if the encoder has the layers."""
    layers = int(config["num_hidden_layers"]) - (1 if penultimate else 0)
    return max(1, min(2, layers - 1))


def spec(name: str, config: Mapping[str, Any], *, penultimate: bool = False, pooled: bool = False) -> ComponentSpec:
    """The spec for the encoder in subfolder `name` with transformers config `config`."""
    d, k = int(config["hidden_size"]), clip_skip_max(config, penultimate)
    outputs = [TensorSpec("text_embeddings", ("T", TEXT_LENGTH, d)), TensorSpec("skipped_embeddings", ("T", k, TEXT_LENGTH, d))]
    if pooled:
        outputs.append(TensorSpec("pooled_embeddings", ("T", int(config["projection_dim"]))))
    vocab = int(config.get("vocab_size", 49408))
    return ComponentSpec(
        name,
        inputs=(TensorSpec("input_ids", ("T", TEXT_LENGTH), "int32", sample="ids"),),
        outputs=tuple(outputs),
        description=f"CLIP text encoder ({d} wide{', pooled projection' if pooled else ''}): token ids -> per-token embeddings",
        weights=name,
        prefix="model.",
        load=lambda model_dir, allow_pickle: load(Path(model_dir) / name, allow_pickle, k, penultimate, pooled),
        ids_range=(0, vocab - 2, vocab - 1),
        token_embedding="text_model.embeddings.token_embedding.weight",
    )


class TextEncoder(nn.Module):
    def __init__(self, clip: nn.Module, skip_max: int, penultimate: bool, pooled: bool):
        super().__init__()
        self.model, self.skip_max, self.penultimate, self.pooled = clip, skip_max, penultimate, pooled

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # int32 in the contract (TensorRT prefers it); CLIP's embedding lookup wants int64.
        out = self.model(input_ids.long(), output_hidden_states=True)
        hidden = out.hidden_states
        if self.penultimate:  # SDXL: hidden_states[-2]; clip_skip=k -> hidden_states[-(k + 2)], no final norm
            main = hidden[-2]
            skipped = [hidden[-(k + 2)] for k in range(1, self.skip_max + 1)]
        else:  # SD: last_hidden_state; clip_skip=k -> final_layer_norm(hidden_states[-(k + 1)])
            norm = self.model.text_model.final_layer_norm
            main = out[0]
            skipped = [norm(hidden[-(k + 1)]) for k in range(1, self.skip_max + 1)]
        result = (main, torch.stack(skipped, dim=1))
        return result + (out.text_embeds,) if self.pooled else result


def load(folder: Path, allow_pickle: bool, skip_max: int, penultimate: bool, pooled: bool) -> nn.Module:
    from ...errors import require

    transformers = require("transformers", "export", "sdtrt export")
    cls = transformers.CLIPTextModelWithProjection if pooled else transformers.CLIPTextModel
    model = cls.from_pretrained(folder, use_safetensors=not allow_pickle).eval()
    return TextEncoder(model, skip_max, penultimate, pooled)
