"""BERT text encoders (transformers' BertModel: Taiyi's Chinese encoder).

Per token row: input_ids int32 [T,L] -> text_embeddings [T,L,D], L = the tokenizer's model_max_length
(512 for Taiyi), because diffusers' StableDiffusionPipeline pads every prompt to it.

What diffusers feeds the UNet, and so what this graph computes: `text_encoder(ids, attention_mask=mask)[0]`,
the last hidden state (no pooler, no final norm beyond BERT's own). The mask is passed only when the text
encoder config says `use_attention_mask: true`; Taiyi's does not, so its padding is attended to, as in
diffusers. With the flag the graph rebuilds the tokenizer's mask from the ids: 1 up to the last id that is
not [PAD] (the closing [SEP]), 0 after - the same mask whatever the prompt holds.

clip_skip has no meaning here (diffusers' clip_skip reads CLIP's final layer norm), so there is no
skipped_embeddings output; the family refuses clip_skip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..spec import ComponentSpec, TensorSpec


def spec(name: str, config: Mapping[str, Any], tokenizer: Mapping[str, Any]) -> ComponentSpec:
    """The spec for the encoder in subfolder `name`: `config` its config.json, `tokenizer` the facts read
    from its tokenizer folder (model_max_length, pad_token_id)."""
    d, length = int(config["hidden_size"]), int(tokenizer["model_max_length"])
    vocab = int(config["vocab_size"])
    mask_pad = int(tokenizer["pad_token_id"]) if config.get("use_attention_mask") else None
    return ComponentSpec(
        name,
        inputs=(TensorSpec("input_ids", ("T", length), "int32", sample="ids"),),
        outputs=(TensorSpec("text_embeddings", ("T", length, d)),),
        description=f"BERT text encoder ({d} wide, {length} tokens): token ids -> per-token embeddings",
        weights=name,
        prefix="model.",
        load=lambda model_dir, allow_pickle: load(Path(model_dir) / name, allow_pickle, mask_pad),
        # sample ids span the vocabulary; which ids stand for [CLS]/[SEP] does not matter to a graph comparison
        ids_range=(0, vocab - 2, vocab - 1),
        token_embedding=None,  # no Textual Inversion rows: embeddings are made for CLIP vocabularies
    )


class TextEncoder(nn.Module):
    def __init__(self, bert: nn.Module, mask_pad: int | None):
        super().__init__()
        self.model, self.mask_pad = bert, mask_pad

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.long()  # int32 in the contract (TensorRT prefers it); the embedding lookup wants int64
        mask = None
        if self.mask_pad is not None:
            pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            last = torch.where(ids != self.mask_pad, pos, torch.zeros_like(pos)).amax(dim=1, keepdim=True)
            mask = (pos <= last).long()
        return self.model(ids, attention_mask=mask).last_hidden_state


def load(folder: Path, allow_pickle: bool, mask_pad: int | None) -> nn.Module:
    from ...errors import require

    transformers = require("transformers", "export", "sdtrt export")
    model = transformers.BertModel.from_pretrained(folder, use_safetensors=not allow_pickle).eval()
    return TextEncoder(model, mask_pad)
