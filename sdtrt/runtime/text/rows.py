"""What both tokenizers (CLIP BPE, BERT WordPiece) share: prompts -> fixed-length rows, as diffusers feeds
its text encoders: a start id, the prompt's ids cut to fit, an end id, padding."""

from __future__ import annotations

import logging
import re

import torch

log = logging.getLogger("sdtrt")


class FixedLengthRows:
    """Base of the tokenizers: subclasses give `token_ids`, `decode`, `_truncation_message` and the fields below."""

    max_length: int
    bos_id: int
    eos_id: int
    pad_id: int
    added: dict[str, tuple[int, bool, bool]]  # added token -> (id, lstrip, rstrip)
    _added_re: re.Pattern  # matches any added token, longest first

    def token_ids(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _truncation_message(self, n_tokens: int, dropped: str) -> str:
        raise NotImplementedError

    def _split_added(self, text: str) -> list[tuple[str, int | None]]:
        """Cut the text at added tokens (as transformers' trie does); (chunk, id or None)."""
        out: list[tuple[str, int | None]] = []
        start = 0
        for m in self._added_re.finditer(text):
            if m.start() < start:  # inside whitespace an rstrip token already consumed
                continue
            tid, lstrip, rstrip = self.added[m.group(0)]
            left = text[start : m.start()]
            out.append((left.rstrip() if lstrip else left, None))
            out.append((m.group(0), tid))
            start = m.end()
            if rstrip:
                while start < len(text) and text[start].isspace():
                    start += 1
        out.append((text[start:], None))
        return [(c, t) for c, t in out if c or t is not None]

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
