"""BERT's WordPiece tokenizer, standard library only (`unicodedata` for character classes).

Gives the ids that transformers' slow `BertTokenizer` (the class StableDiffusionPipeline loads for Taiyi's
`tokenizer/` folder, transformers 4.57) gives, called as diffusers calls it: `padding="max_length",
max_length=model_max_length, truncation=True` -> `[CLS] ids [SEP] [PAD]...`, L = model_max_length ids.
The steps, in transformers' order (each one matters for some prompt):

1. With do_lower_case, every character outside a special token (`[CLS]`, `[SEP]`, ... typed in the prompt,
   matched case-sensitively) is lower-cased on its own - so a final capital sigma becomes "σ", not "ς" - and
   line breaks are left as they are (transformers does this with the regex `(specials)|(.+?)`).
2. Added tokens (the special tokens, and any in tokenizer_config.json's added_tokens_decoder) are split out
   and become their ids; lstrip/rstrip eat the whitespace beside them.
3. The basic tokenizer, on each remaining piece: drop NUL, U+FFFD and control characters (Unicode category C*:
   zero-width space, joiners, BOM, private use, unassigned), turn whitespace (space, tab, CR, LF, category
   Zs: ideographic space, no-break space) into spaces; put spaces around every CJK ideograph (the ranges
   below: kana, Hangul and full-width forms are *not* in them); NFC; split on whitespace (`str.split`, which
   also splits at U+2028/U+2029 and U+001C..U+001F); per word: lower-case and strip accents (NFD, drop
   category Mn - this also decomposes Hangul syllables into jamo) as the config says; split off every
   punctuation character (ASCII non-alphanumerics and category P*) as a word of its own.
4. WordPiece, per word: greedy longest match from the left, continuations prefixed "##"; a word with a piece
   not in the vocabulary, or longer than 100 characters, is one [UNK].

Python's `unicodedata` is the oracle's own, so character classes agree by construction. transformers'
BertTokenizerFast (Rust) lower-cases whole words and skips the NFC step, so it can differ (see the tests).
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Mapping

from .rows import FixedLengthRows


VOCAB_FILE = "vocab.txt"
MAX_WORD_CHARS = 100  # transformers' WordpieceTokenizer.max_input_chars_per_word
# transformers' SPECIAL_TOKENS_ATTRIBUTES order (bos/eos unset for BERT): the order of its lower-casing regex
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_DEFAULTS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}

# The "CJK Unified Ideographs" blocks BERT isolates (Google's original list): URO, extensions A-E,
# compatibility ideographs and their supplement.
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def is_cjk(c: str) -> bool:
    cp = ord(c)
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_whitespace(c: str) -> bool:
    return c in " \t\n\r" or unicodedata.category(c) == "Zs"


def _is_control(c: str) -> bool:
    return c not in "\t\n\r" and unicodedata.category(c).startswith("C")


def _is_punctuation(c: str) -> bool:
    cp = ord(c)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:  # all ASCII non-alphanumerics
        return True
    return unicodedata.category(c).startswith("P")


def _strip_accents(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")


def _content(token: Any) -> str:
    return token["content"] if isinstance(token, dict) else str(token)


class WordPieceTokenizer(FixedLengthRows):
    """`encode(prompts) -> LongTensor[B, L]`, L = the tokenizer's model_max_length (512 for Taiyi)."""

    def __init__(self, vocab: Mapping[str, int], *, do_lower_case: bool = True, strip_accents: bool | None = None,
                 tokenize_chinese_chars: bool = True, do_basic_tokenize: bool = True, never_split: Iterable[str] = (),
                 special_tokens: Mapping[str, str] | None = None, additional_special_tokens: Iterable[str] = (),
                 added_tokens: Mapping[str, Mapping[str, Any]] | None = None, max_length: int = 512):
        self.vocab = dict(vocab)
        self.do_lower_case, self.strip_accents = bool(do_lower_case), strip_accents
        self.tokenize_chinese_chars, self.do_basic_tokenize = bool(tokenize_chinese_chars), bool(do_basic_tokenize)
        self.never_split = frozenset(never_split)
        specials = {**_DEFAULTS, **(special_tokens or {})}
        self.unk, self.cls, self.sep, self.pad = specials["unk_token"], specials["cls_token"], specials["sep_token"], specials["pad_token"]
        self.special_strings = list(dict.fromkeys([specials[k] for k in _SPECIAL_KEYS if specials.get(k)] + list(additional_special_tokens)))
        # content -> (id, lstrip, rstrip, special, normalized); specials missing from the vocabulary get ids after it, as transformers adds them
        added: dict[str, tuple[int, bool, bool, bool, bool]] = {}
        for content, info in (added_tokens or {}).items():
            added[content] = (int(info["id"]), bool(info.get("lstrip")), bool(info.get("rstrip")),
                              bool(info.get("special", True)), bool(info.get("normalized", False)))
        for content in self.special_strings:
            if content not in added:
                tid = self.vocab[content] if content in self.vocab else len(self.vocab) + len([a for a in added if a not in self.vocab])
                added[content] = (tid, False, False, True, False)
        self.added = {k: v[:3] for k, v in added.items()}  # content -> (id, lstrip, rstrip), as CLIPTokenizer has it
        protected = self.special_strings + [c for c, v in added.items() if not v[3] and v[4]]
        self._lower_re = re.compile("(" + ("|".join(re.escape(t) for t in protected) or "(?!)") + r")|(.+?)")
        self._added_re = re.compile("|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)) or "(?!)")
        self.unk_id = self._id(self.unk)
        self.bos_id, self.eos_id, self.pad_id = self._id(self.cls), self._id(self.sep), self._id(self.pad)
        self.max_length = int(max_length)
        self._longest = max((len(t) for t in self.vocab), default=1)
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_dir(cls, folder: Path | str) -> "WordPieceTokenizer":
        """A tokenizer folder as BertTokenizer.save_pretrained writes it (vocab.txt, tokenizer_config.json,
        special_tokens_map.json), or the older layout without added_tokens_decoder (Taiyi's)."""
        folder = Path(folder)
        lines = (folder / VOCAB_FILE).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the file's final newline (transformers reads with readlines() and strips "\n" only)
        vocab: dict[str, int] = {}
        for i, token in enumerate(lines):
            vocab[token] = i  # a repeated line keeps its last index, as transformers' OrderedDict does
        config = _read(folder / "tokenizer_config.json")
        if "added_tokens_decoder" in config:  # written by transformers >= 4.34: the config says it all
            settings = config
            added = {v["content"]: {"id": int(k), **v} for k, v in config["added_tokens_decoder"].items()}
        else:  # older folders (Taiyi's): special_tokens_map.json overrides the config, added_tokens.json adds tokens
            settings = {**config, **_read(folder / "special_tokens_map.json")}
            specials = {_content(v) for k, v in settings.items() if k in _SPECIAL_KEYS and v is not None}
            specials |= {_content(t) for t in settings.get("additional_special_tokens") or []}
            added = {t: {"id": int(i), "special": t in specials, "normalized": t not in specials}
                     for t, i in _read(folder / "added_tokens.json").items()}
        specials = {k: _content(v) for k, v in settings.items() if k in _SPECIAL_KEYS and v is not None}
        additional = [_content(t) for t in settings.get("additional_special_tokens") or []]
        return cls(vocab, do_lower_case=config.get("do_lower_case", True), strip_accents=config.get("strip_accents"),
                   tokenize_chinese_chars=config.get("tokenize_chinese_chars", True),
                   do_basic_tokenize=config.get("do_basic_tokenize", True), never_split=config.get("never_split") or (),
                   special_tokens=specials, additional_special_tokens=additional, added_tokens=added,
                   max_length=int(config.get("model_max_length", 512)))

    def _id(self, token: str) -> int:
        hit = self.added.get(token)
        return hit[0] if hit is not None else self.vocab.get(token, self.vocab.get(self.unk, 0))

    # --- text -> ids ---------------------------------------------------------------------------

    def basic_words(self, text: str) -> list[str]:
        """transformers' BasicTokenizer.tokenize (never_split = the config's list and the special tokens)."""
        never = self.never_split | set(self.special_strings)
        chars = []
        for c in text:
            if c == "\0" or c == "\ufffd" or _is_control(c):
                continue
            if _is_whitespace(c):
                chars.append(" ")
            elif self.tokenize_chinese_chars and is_cjk(c):
                chars += [" ", c, " "]
            else:
                chars.append(c)
        words = []
        for token in unicodedata.normalize("NFC", "".join(chars)).split():
            if token not in never:
                if self.do_lower_case:
                    token = token.lower()
                    if self.strip_accents is not False:
                        token = _strip_accents(token)
                elif self.strip_accents:
                    token = _strip_accents(token)
            words += self._split_punctuation(token, never)
        return " ".join(words).split()

    @staticmethod
    def _split_punctuation(word: str, never: frozenset | set) -> list[str]:
        if word in never:
            return [word]
        out: list[str] = []
        current: list[str] = []
        for c in word:
            if _is_punctuation(c):
                if current:
                    out.append("".join(current))
                    current = []
                out.append(c)
            else:
                current.append(c)
        if current:
            out.append("".join(current))
        return out

    def _wordpiece(self, word: str) -> tuple[int, ...]:
        """Greedy longest-match-first pieces of one word (cached: prompts repeat words)."""
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        ids: list[int] = []
        if len(word) > MAX_WORD_CHARS:
            ids = [self.unk_id]
        else:
            start = 0
            while start < len(word):
                end = min(len(word), start + self._longest)  # no vocabulary entry is longer
                piece = None
                while start < end:
                    sub = word[start:end] if start == 0 else "##" + word[start:end]
                    if sub in self.vocab:
                        piece = sub
                        break
                    end -= 1
                if piece is None:
                    ids = [self.unk_id]
                    break
                ids.append(self._id(piece))
                start = end
        result = tuple(ids)
        if len(self._cache) < 100_000:
            self._cache[word] = result
        return result

    def token_ids(self, text: str) -> list[int]:
        """Ids of the text alone: no [CLS]/[SEP], no truncation."""
        if self.do_lower_case and self.do_basic_tokenize:  # transformers reads do_lower_case from its basic tokenizer
            text = self._lower_re.sub(lambda m: m.group(1) or m.group(2).lower(), text)
        ids: list[int] = []
        for chunk, tid in self._split_added(text):
            if tid is not None:
                ids.append(tid)
            elif not self.do_basic_tokenize:
                for word in chunk.split():
                    ids.extend(self._wordpiece(word))
            else:
                for word in self.basic_words(chunk):
                    # a never_split word is looked up whole (transformers: vocab id, else [UNK])
                    ids.extend((self._id(word),) if word in self.never_split else self._wordpiece(word))
        return ids

    def _truncation_message(self, n_tokens: int, dropped: str) -> str:
        return (f"prompt has {n_tokens} tokens but this BERT text encoder takes {self.max_length - 2}; dropped {dropped!r} "
                "(diffusers truncates the same way). Shorten the prompt to keep it all")

    def decode(self, ids: list[int]) -> str:
        """Text for ids (for messages): pieces joined, '##' continuations glued, special tokens left out."""
        if not hasattr(self, "_inverse"):
            self._inverse = {v: k for k, v in self.vocab.items()} | {v[0]: k for k, v in self.added.items()}
        specials = {self.bos_id, self.eos_id, self.pad_id}
        text = " ".join(self._inverse.get(i, self.unk) for i in ids if i not in specials)
        return text.replace(" ##", "").strip()

    def add_tokens(self, tokens: Mapping[str, int], expand: Mapping[str, list[int]] | None = None) -> None:
        from ...errors import SdtrtError

        raise SdtrtError("Textual Inversion embeddings are made for CLIP tokenizers; this model's WordPiece (BERT) tokenizer "
                         "cannot take them.", "use the embedding with a CLIP-based model (SD 1.x/2.x, SDXL)")


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}
