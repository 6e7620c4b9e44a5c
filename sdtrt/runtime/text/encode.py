"""Prompts -> text-encoder embeddings for one encoder, in either prompt syntax. Families combine
encoders (SD: one; SDXL: two, concatenated) and decide what the UNet gets."""

from __future__ import annotations

from typing import Protocol

import torch

from . import prompt_weights
from .factory import Tokenizer


class TextEncoders(Protocol):
    def tokenizer(self, component: str) -> Tokenizer: ...  # CLIP BPE or WordPiece (runtime/text/factory.py)

    def run(self, component: str, ids: torch.Tensor) -> dict[str, torch.Tensor]: ...


def embed(text: TextEncoders, component: str, texts: list[str], syntax: str, clip_skip: int | None = None,
          skip_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([N, 77 x chunks, D] embeddings, [N, P] pooled or None) for N texts, in one encoder call.

    clip_skip applies to the first `skip_rows` texts only: diffusers skips layers for the prompt,
    never for the negative prompt. With the a1111 syntax, the pooled output is the first chunk's
    (as A1111 does)."""
    tok = text.tokenizer(component)
    if syntax == "plain":
        out = text.run(component, tok.encode(texts))
        return _skipped(out, clip_skip, skip_rows), out.get("pooled_embeddings")
    chunked = [prompt_weights.chunk(tok, t) for t in texts]
    count = max(c.ids.shape[0] for c in chunked)
    chunked = [prompt_weights.padded(c, count, tok) for c in chunked]
    out = text.run(component, torch.cat([c.ids for c in chunked]))
    z = _skipped(out, clip_skip, skip_rows * count)
    z = z.reshape(len(texts), count, *z.shape[1:])
    z = torch.stack([prompt_weights.apply_weights(z[i], c.weights) for i, c in enumerate(chunked)])
    pooled = out.get("pooled_embeddings")
    if pooled is not None:
        pooled = pooled.reshape(len(texts), count, -1)[:, 0]
    return z.reshape(len(texts), count * z.shape[2], z.shape[3]), pooled


def _skipped(out: dict[str, torch.Tensor], clip_skip: int | None, rows: int) -> torch.Tensor:
    z = out["text_embeddings"]
    if clip_skip is None or rows == 0:
        return z
    return torch.cat([out["skipped_embeddings"][:rows, clip_skip - 1], z[rows:]])
