"""What both tokenizers (CLIP BPE, BERT WordPiece) share: prompts -> fixed-length rows, as diffusers feeds
its text encoders: a start id, the prompt's ids cut to fit, an end id, padding."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger("sdtrt")


class FixedLengthRows:
    """Base of the tokenizers: subclasses give `token_ids`, `decode`, `_truncation_message` and the ids below."""

    max_length: int
    bos_id: int
    eos_id: int
    pad_id: int

    def token_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _truncation_message(self, n_tokens: int, dropped: str) -> str:
        raise NotImplementedError

    def encode(self, prompts: list[str] | str) -> torch.Tensor:
        """LongTensor [B, max_length]: start id, up to max_length - 2 ids, end id, then padding."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        room = self.max_length - 2
        rows = []
        for p in prompts:
            ids = self.token_ids(p)
            if len(ids) > room:
                log.warning("%s", self._truncation_message(len(ids), shortened(self.decode(ids[room:]))))
                ids = ids[:room]
            row = [self.bos_id, *ids, self.eos_id]
            rows.append(row + [self.pad_id] * (self.max_length - len(row)))
        return torch.tensor(rows, dtype=torch.long)


def shortened(dropped: str, limit: int = 40) -> str:
    """The dropped text for a one-line warning, whatever its length (diffusers' warning repeats all of it)."""
    dropped = " ".join(dropped.split())
    return dropped[:limit].rstrip() + "…" if len(dropped) > limit else dropped
