"""Textual Inversion embeddings -> per text encoder the new token rows: `parse_embedding(path, widths)`.

Layouts (the file's keys):
  A1111        {"string_to_param": {"*": [n, D]}, "name": ..., ...} (.pt: pickle, opt-in), or a flat "string_to_param.*"
  diffusers    {token: [D] or [n, D]} (learned_embeds.safetensors / .bin): the key is the token
  kohya        {"emb_params": [n, D]}
  SDXL         {"clip_l": [n, 768], "clip_g": [n, 1280]}: text_encoder and text_encoder_2
  a bare tensor [n, D] (.pt, opt-in)

The token is the one the caller gives, else the diffusers key, else the file name without suffix
(as A1111 names embeddings). An n-vector embedding adds n tokens, named as diffusers names them:
token, token_1, ..., token_{n-1}.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from ..errors import SdtrtError
from ..files import file_sha256
from .files import listing, non_finite, read_file
from .names import TEXT_ENCODERS

SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}
FIX_FORMAT = "pass an A1111, diffusers, kohya or SDXL (clip_l/clip_g) textual inversion file"


@dataclasses.dataclass(frozen=True)
class Embedding:
    token: str
    vectors: Mapping[str, Tensor] = dataclasses.field(repr=False)  # text encoder subfolder -> [n, D] fp32
    path: Path
    sha256: str

    @property
    def tokens(self) -> list[str]:
        n = next(iter(self.vectors.values())).shape[0]
        return [self.token] + [f"{self.token}_{i}" for i in range(1, n)]


def text_widths(config: Mapping[str, Any]) -> dict[str, int]:
    """Text encoder subfolder -> hidden size, from a family config."""
    return {name: int(config[name]["hidden_size"]) for name in TEXT_ENCODERS if config.get(name) is not None}


def parse_embedding(path: Path | str, widths: Mapping[str, int], token: str | None = None, *,
                    allow_pickle: bool = False) -> Embedding:
    """Read an embedding for a model whose text encoders have these widths ({"text_encoder": 768, ...})."""
    path = Path(path)
    obj, _ = read_file(path, allow_pickle)
    vectors, named = vectors_in(path, obj)
    bad = non_finite(vectors)
    if bad:
        raise SdtrtError(f"{path.name}: the vectors for {', '.join(bad)} hold NaN or infinite values.",
                         "the file is damaged or its training diverged: use another checkpoint of it")
    vectors = {e: v for e, v in vectors.items() if e in widths}  # an SDXL refiner has no text_encoder: clip_l goes unused
    for encoder, width in widths.items():
        if encoder not in vectors:
            raise SdtrtError(f"{path.name} has no vectors for this model's {encoder} (it is an embedding for "
                             f"{'an SD 1.x/2.x model' if encoder == 'text_encoder_2' else 'SDXL'}).",
                             "use an embedding trained for this model's text encoders (SDXL embeddings hold clip_l and clip_g)")
        if vectors[encoder].shape[1] != width:
            raise SdtrtError(f"{path.name}: its vectors for {encoder} are {vectors[encoder].shape[1]} wide, but this model's "
                             f"{encoder} takes {width} (an embedding for another model family).",
                             "use an embedding trained for this model's text encoder")
    if len({v.shape[0] for v in vectors.values()}) > 1:
        raise SdtrtError(f"{path.name}: its encoders have different vector counts "
                         f"({', '.join(f'{e} {v.shape[0]}' for e, v in vectors.items())}).", "the file is damaged: re-export it")
    token = token or named or path.stem
    if not token.strip():
        raise SdtrtError(f"{path.name}: the embedding's token is empty.", "pass a token (token=... / --embedding FILE:TOKEN)")
    return Embedding(token, {e: v.float().contiguous() for e, v in vectors.items()}, path, file_sha256(path))


def vectors_in(path: Path, obj: Any) -> tuple[dict[str, Tensor], str | None]:
    """({encoder: [n, D]}, the token the file names or None) for each layout."""
    if isinstance(obj, Tensor):
        return {"text_encoder": rows(path, obj, "the tensor")}, None
    if not isinstance(obj, dict) or not obj:
        raise SdtrtError(f"{path.name} holds {type(obj).__name__}, not an embedding.", FIX_FORMAT)
    if isinstance(obj.get("string_to_param"), dict):  # A1111
        params = obj["string_to_param"]
        param = params.get("*", next(iter(params.values())) if len(params) == 1 else None)
        return {"text_encoder": rows(path, param, "string_to_param['*']")}, None
    if "string_to_param.*" in obj:  # A1111, flattened into safetensors
        return {"text_encoder": rows(path, obj["string_to_param.*"], "string_to_param.*")}, None
    if "emb_params" in obj:  # kohya
        return {"text_encoder": rows(path, obj["emb_params"], "emb_params")}, None
    if set(obj) & set(SDXL_KEYS):
        return {SDXL_KEYS[k]: rows(path, v, k) for k, v in obj.items() if k in SDXL_KEYS}, None
    if len(obj) == 1:  # diffusers: {token: vectors}
        (name, value), = obj.items()
        return {"text_encoder": rows(path, value, repr(name))}, str(name)
    raise SdtrtError(f"{path.name} is not a textual inversion layout sdtrt knows (keys: {listing([str(k) for k in obj])}).", FIX_FORMAT)


def rows(path: Path, value: Any, what: str) -> Tensor:
    """The vectors as [n, D]: a single [D] vector is one row."""
    if not isinstance(value, Tensor) or value.dim() not in (1, 2) or not value.is_floating_point() or value.numel() == 0:
        shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise SdtrtError(f"{path.name}: {what} is {shape}, not embedding vectors [n, D].", FIX_FORMAT)
    return value.detach().reshape(-1, value.shape[-1])
