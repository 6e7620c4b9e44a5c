"""Opt-in A1111 prompt syntax: emphasis weights and prompts longer than 75 tokens.

The rule, exactly (prompt_syntax="a1111"):
* `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:1.3)` multiplies
  it by 1.3; nesting multiplies (`((a))` = 1.21). `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are literal
  characters. An opening bracket never closed weights the rest of the prompt; a closing bracket
  never opened is literal text.
* `BREAK` (upper case, a word of its own) ends the current 75-token chunk.
* Each run of text with one weight is tokenized on its own. The token ids are cut into chunks of 75;
  each chunk is wrapped as `bos, ids, eos, padding` (77 ids, the tokenizer's own padding) and
  encoded separately; the embeddings are concatenated along the sequence (77 x chunks). The
  negative prompt and every prompt of a batch are padded with empty chunks to the same count.
* Weights: per prompt and per chunk, the embeddings z become z * w (w per token; bos, eos and
  padding keep 1) and are then rescaled so the chunk's mean equals the unweighted chunk's mean.
  (A1111 takes that mean over the whole batch; per prompt keeps a prompt's image independent of
  what it is batched with.)

A prompt of at most 75 tokens without weights gives exactly the plain (diffusers) path's ids and
embeddings. The default, prompt_syntax="plain", is diffusers' behaviour: truncate at 77, and
brackets are ordinary text.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from .tokenizer import CLIPTokenizer

SYNTAXES = ("plain", "a1111")
CHUNK = 75
_TOKENS = re.compile(r"\\[()\[\]\\]|\(|\)|\[|\]|:\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*\)|[^\\()\[\]:]+|[\\:]")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse(prompt: str) -> list[tuple[str, float]]:
    """(text, weight) runs; a run ("BREAK", -1.0) marks a chunk break. Adjacent equal weights merge."""
    runs: list[list] = []  # [text, weight]
    open_round: list[int] = []  # index into runs where each open bracket started
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _TOKENS.finditer(prompt):
        tok = m.group(0)
        if tok.startswith("\\") and len(tok) == 2:
            runs.append([tok[1], 1.0])
        elif tok == "(":
            open_round.append(len(runs))
        elif tok == "[":
            open_square.append(len(runs))
        elif tok.startswith(":") and tok.endswith(")") and open_round:
            scale(open_round.pop(), float(tok[1:-1]))
        elif tok == ")" and open_round:
            scale(open_round.pop(), 1.1)
        elif tok == "]" and open_square:
            scale(open_square.pop(), 1 / 1.1)
        else:
            parts = _BREAK.split(tok)
            for i, part in enumerate(parts):
                if i:
                    runs.append(["BREAK", -1.0])
                if part:
                    runs.append([part, 1.0])
    for start in open_round:
        scale(start, 1.1)
    for start in open_square:
        scale(start, 1 / 1.1)
    merged: list[list] = []
    for text, weight in runs:
        if merged and merged[-1][1] == weight and weight != -1.0:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(t, w) for t, w in merged] or [("", 1.0)]


@dataclasses.dataclass
class Chunked:
    ids: torch.Tensor  # [chunks, 77] int64
    weights: torch.Tensor  # [chunks, 77] float32


def chunk(tokenizer: CLIPTokenizer, prompt: str) -> Chunked:
    """Token ids and per-token weights of one prompt, in 77-id chunks."""
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []

    def close() -> None:
        chunks.append((ids.copy(), weights.copy()))
        ids.clear()
        weights.clear()

    for text, weight in parse(prompt):
        if weight == -1.0:  # BREAK
            close()
            continue
        for tid in tokenizer.token_ids(text):
            if len(ids) == CHUNK:
                close()
            ids.append(tid)
            weights.append(weight)
    if ids or not chunks:
        close()
    rows, wrows = [], []
    for cids, cweights in chunks:
        pad = tokenizer.max_length - 2 - len(cids)
        rows.append([tokenizer.bos_id, *cids, tokenizer.eos_id] + [tokenizer.pad_id] * pad)
        wrows.append([1.0, *cweights, 1.0] + [1.0] * pad)
    return Chunked(torch.tensor(rows, dtype=torch.long), torch.tensor(wrows, dtype=torch.float32))


def padded(c: Chunked, count: int, tokenizer: CLIPTokenizer) -> Chunked:
    """Append empty chunks (bos, eos, padding) up to `count`."""
    missing = count - c.ids.shape[0]
    if missing <= 0:
        return c
    empty = [tokenizer.bos_id, tokenizer.eos_id] + [tokenizer.pad_id] * (tokenizer.max_length - 2)
    ids = torch.cat([c.ids, torch.tensor([empty] * missing, dtype=torch.long)])
    return Chunked(ids, torch.cat([c.weights, torch.ones(missing, tokenizer.max_length)]))


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """z [chunks, 77, D] for one prompt; weights [chunks, 77]. Mean-preserving per chunk (see module doc)."""
    if bool((weights == 1.0).all()):
        return z
    zf = z.float()
    before = zf.mean(dim=(1, 2), keepdim=True)
    zf = zf * weights[:, :, None].to(zf.device)
    after = zf.mean(dim=(1, 2), keepdim=True)
    return (zf * (before / after)).to(z.dtype)


_LORA_TAG = re.compile(r"<lora:([^:>]*)(?::([^:>]*))?(?::[^>]*)?>")


def lora_tags(prompt: str) -> tuple[str, list[tuple[str, str]]]:
    """A1111's `<lora:NAME>` / `<lora:NAME:SCALE>` tags: (the prompt without them, [(NAME, SCALE text)]).
    A1111 removes the tags from the text the encoder sees; a missing scale means 1."""
    tags = [(m.group(1).strip(), (m.group(2) or "1").strip()) for m in _LORA_TAG.finditer(prompt)]
    return _LORA_TAG.sub("", prompt), tags


def lora_scale(name: str, scale: str) -> float:
    """A tag's SCALE text as a number; anything else (words, nan, inf) is refused naming the tag."""
    import math

    from ...errors import SdtrtError

    try:
        value = float(scale)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise SdtrtError(f"<lora:{name}:{scale}>: the scale is not a number.", f"write <lora:{name}:0.8>")
    return value
