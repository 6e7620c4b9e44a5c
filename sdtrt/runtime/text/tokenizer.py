"""CLIP's byte-level BPE tokenizer, standard library only.

Gives the ids that transformers' CLIPTokenizer (the class StableDiffusionPipeline loads, with ftfy
installed, transformers 4.57) gives for the same tokenizer folder; `text_cleaning` runs ftfy as
transformers does (mojibake repair included). Known, deliberate details it reproduces:

* added tokens in tokenizer_config.json are split out first and never BPE'd. For SD2 tokenizers the
  pad token "!" is such a token, so a literal "!" in a prompt becomes id 0 (not "!</w>", 256),
  and "!!!" three times id 0 - exactly what diffusers feeds SD2 models.
* "<|endoftext|>" typed in a prompt in any case becomes the special id (the pre-tokenizer matches it
  case-insensitively after lower-casing).
* digits are split one per token; letters, and runs of other symbols, form words.
* Unicode classes come from Python's `unicodedata` (Unicode 14 on Python 3.11); transformers' `regex`
  module may know newer characters. Characters assigned after that version can split differently.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from pathlib import Path

from .cleaning import WHITESPACE, clean
from .rows import FixedLengthRows


BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_SPECIAL_LITERALS = (BOS, EOS)
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_LETTER, _NUMBER, _SPACE, _OTHER, _NONE = range(5)


@functools.lru_cache(maxsize=65536)
def _kind(c: str) -> int:
    if c in WHITESPACE:
        return _SPACE
    if c == "\u0345":  # a mark whose upper case is a letter: CLIP's case-insensitive pattern skips it
        return _NONE
    cat = unicodedata.category(c)
    return _LETTER if cat[0] == "L" else _NUMBER if cat[0] == "N" else _OTHER


def _fold(s: str) -> str:
    return "".join(c.casefold() if len(c.casefold()) == 1 else c for c in s)


# The same pattern for ASCII text, where stdlib `re` classes agree with the Unicode ones.
_ASCII_WORDS = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+", re.IGNORECASE)


def pre_tokenize(text: str) -> list[str]:
    """CLIP's word split: specials | contractions | letter runs | single digits | other-symbol runs."""
    if text.isascii():
        return _ASCII_WORDS.findall(text)
    words, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "<":
            lit = next((s for s in _SPECIAL_LITERALS if _fold(text[i : i + len(s)]) == s), None)
            if lit:
                words.append(lit)
                i += len(lit)
                continue
        if c == "'":
            con = next((s for s in _CONTRACTIONS if _fold(text[i : i + len(s)]) == s), None)
            if con:
                words.append(text[i : i + len(con)])
                i += len(con)
                continue
        kind = _kind(c)
        if kind == _NUMBER:
            words.append(c)
            i += 1
        elif kind in (_LETTER, _OTHER):
            j = i + 1
            while j < n and _kind(text[j]) == kind:
                j += 1
            words.append(text[i:j])
            i = j
        else:
            i += 1
    return words


def _byte_chars() -> list[str]:
    """Byte b -> the printable character CLIP's vocabulary uses for it (GPT-2's reversible map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_BYTE_CHARS = _byte_chars()


class CLIPTokenizer(FixedLengthRows):
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS,
                 added_tokens: dict[str, dict] | None = None, max_length: int = 77):
        self.vocab = vocab
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        self.pad_id = vocab[pad_token]
        self.max_length = max_length
        # content -> (id, lstrip, rstrip); longest first so that a longer token wins at a position
        added = added_tokens or {BOS: {"id": self.bos_id}, EOS: {"id": self.eos_id}}
        self.added = {k: (v["id"], bool(v.get("lstrip")), bool(v.get("rstrip"))) for k, v in added.items()}
        self.expansions: dict[str, tuple[int, ...]] = {}  # Textual Inversion: "tok" -> ids of tok, tok_1, ...
        self._compile_added()
        self._cache: dict[str, tuple[int, ...]] = {}

    def _compile_added(self) -> None:
        self._added_re = re.compile("|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)))

    def add_tokens(self, tokens: dict[str, int], expand: dict[str, list[int]] | None = None) -> None:
        """Add tokens with fixed ids (Textual Inversion). `expand` maps a multi-vector embedding's token to
        all its ids, as diffusers rewrites "tok" to "tok tok_1 ..." before tokenizing."""
        for content, tid in tokens.items():
            self.added[content] = (tid, False, False)
        self.expansions.update({k: tuple(v) for k, v in (expand or {}).items()})
        self._compile_added()

    def remove_tokens(self, tokens: list[str], expanded: str | None = None) -> None:
        """Undo add_tokens (an embedding whose weights could not be applied)."""
        for content in tokens:
            self.added.pop(content, None)
        self.expansions.pop(expanded or "", None)
        self._compile_added()
        self._cache.clear()

    @classmethod
    def from_dir(cls, folder: Path | str) -> "CLIPTokenizer":
        folder = Path(folder)
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # CLIP's merge count
        config = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").exists() else {}
        pad = config.get("pad_token", EOS)
        pad = pad["content"] if isinstance(pad, dict) else pad
        added = {v["content"]: {"id": int(k), **v} for k, v in config.get("added_tokens_decoder", {}).items()}
        for special in (BOS, EOS):
            added.setdefault(special, {"id": vocab[special]})
        return cls(vocab, merges, pad, added, int(config.get("model_max_length", 77)))

    # --- text -> ids ---------------------------------------------------------------------------

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids for one pre-tokenized word (cached: prompts repeat words constantly)."""
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        if word in _SPECIAL_LITERALS:
            ids = (self.vocab[word],)
        else:
            chars = "".join(_BYTE_CHARS[b] for b in word.encode("utf-8"))
            parts = [*chars[:-1], chars[-1] + "</w>"]
            while len(parts) > 1:
                # merge the adjacent pair with the lowest rank, everywhere it occurs
                best = min(range(len(parts) - 1), key=lambda i: self.ranks.get((parts[i], parts[i + 1]), 1 << 30))
                pair = (parts[best], parts[best + 1])
                if pair not in self.ranks:
                    break
                merged, i = [], 0
                while i < len(parts):
                    if i < len(parts) - 1 and (parts[i], parts[i + 1]) == pair:
                        merged.append(parts[i] + parts[i + 1])
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
            ids = tuple(self.vocab.get(p, self.eos_id) for p in parts)
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def token_ids(self, text: str) -> list[int]:
        """Ids of the text alone: no bos/eos, no truncation."""
        ids: list[int] = []
        for chunk, tid in self._split_added(text):
            if tid is not None:
                ids.extend(self.expansions.get(chunk, (tid,)))
            else:
                for word in pre_tokenize(clean(chunk)):
                    ids.extend(self._bpe(word))
        return ids

    def _truncation_message(self, n_tokens: int, dropped: str) -> str:
        """One line, whatever the prompt's length: diffusers' warning repeats all the dropped text."""
        return (f"prompt has {n_tokens} tokens but CLIP takes {self.max_length - 2}; dropped {dropped!r}. "
                f'For long prompts use prompt_syntax="a1111" (CLI: --prompt-syntax a1111)')

    def decode(self, ids: list[int]) -> str:
        """Text for ids (for messages such as the truncation warning)."""
        if not hasattr(self, "_inverse"):
            self._inverse = {v: k for k, v in self.vocab.items()}
            self._byte_of = {c: b for b, c in enumerate(_BYTE_CHARS)}
        data = bytearray()
        for i in ids:
            tok = self._inverse.get(i, "")
            if tok in _SPECIAL_LITERALS:
                continue
            data += bytes(self._byte_of[c] for c in tok.removesuffix("</w>") if c in self._byte_of)
            if tok.endswith("</w>"):
                data += b" "
        return data.decode("utf-8", errors="replace").strip()
