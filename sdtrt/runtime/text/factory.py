"""The tokenizer a model's tokenizer folder holds, chosen from its files (as transformers' classes need them):

  vocab.json + merges.txt   CLIP byte-level BPE (SD 1.x/2.x, SDXL)      -> CLIPTokenizer
  vocab.txt                 BERT WordPiece (Taiyi's Chinese encoder)    -> WordPieceTokenizer

Both give `encode(prompts) -> LongTensor[B, L]` (L = the folder's model_max_length: 77 for CLIP, 512 for
Taiyi), `token_ids(text)`, `max_length` and the bos/eos/pad ids the runtime needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ...errors import SdtrtError
from .tokenizer import CLIPTokenizer
from .wordpiece import VOCAB_FILE, WordPieceTokenizer

CLIP_FILES = ("vocab.json", "merges.txt")


class Tokenizer(Protocol):
    max_length: int
    bos_id: int
    eos_id: int
    pad_id: int

    def token_ids(self, text: str) -> list[int]: ...

    def encode(self, prompts: list[str] | str) -> torch.Tensor: ...


def tokenizer_kind(folder: Path | str) -> str:
    """"clip" or "wordpiece"; a folder with neither file set is refused, naming both."""
    folder = Path(folder)
    if all((folder / f).is_file() for f in CLIP_FILES):
        return "clip"
    if (folder / VOCAB_FILE).is_file():
        return "wordpiece"
    raise SdtrtError(f"{folder} holds no tokenizer: it needs vocab.json + merges.txt (CLIP BPE) or vocab.txt (BERT WordPiece).",
                     "use a complete diffusers folder (copy the tokenizer folder from the original checkpoint)")


def load_tokenizer(folder: Path | str) -> Tokenizer:
    return CLIPTokenizer.from_dir(folder) if tokenizer_kind(folder) == "clip" else WordPieceTokenizer.from_dir(folder)
