"""Prompt clean-up before CLIP's BPE, with the standard library only.

Parity target: transformers' CLIPTokenizer (the "slow" one that StableDiffusionPipeline loads) with
ftfy installed, which runs `ftfy.fix_text` with its default configuration, then collapses whitespace
and lower-cases. This module reproduces every default ftfy step except one:

* reproduced: HTML entities (only when the line has no literal '<', ftfy's "auto"), C1 control
  characters read as Windows-1252, Latin ligatures, full/half-width forms, curly quotes, line
  breaks, terminal escapes, control characters, NFC normalisation; repeated to a fixed point.
* not reproduced: ftfy's mojibake repair ("cafÃ©" -> "café"), a statistical heuristic over encodings.
  Prompts that are not mojibake get identical ids; mojibake keeps its odd characters here.

Note what the OpenAI CLIP reference does differently (and transformers does not): it also runs
html.unescape twice. We follow transformers, because diffusers' results come from it.
"""

from __future__ import annotations

import html.entities
import re
import unicodedata

# --- ftfy's tables, rebuilt from the standard library ------------------------------------------


def _html_entities() -> dict[str, str]:
    """Named entities that end in ';', plus upper-cased forms of the unambiguous lower-case ones."""
    table = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            table["&" + name] = char
            if name == name.lower():
                upper = "&" + name.upper()
                if html.unescape(upper) == upper:
                    table[upper] = char.upper()
    return table


HTML_ENTITIES = _html_entities()
HTML_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
C1_CONTROL_RE = re.compile("[\x80-\x9f]")
ANSI_RE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
SINGLE_QUOTE_RE = re.compile("[\u02bc\u2018-\u201b]")
DOUBLE_QUOTE_RE = re.compile("[\u201c-\u201f]")
LIGATURES = {
    ord(k): v
    for k, v in {
        "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
        "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
        "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
    }.items()
}
WIDTH_MAP = {0x3000: " "} | {
    i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0) if unicodedata.normalize("NFKC", chr(i)) != chr(i)
}
CONTROL_CHARS = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)])
# "sloppy" Windows-1252: the five bytes cp1252 leaves undefined map to the same code point.
_CP1252 = {b: (bytes([b]).decode("cp1252") if b not in (0x81, 0x8D, 0x8F, 0x90, 0x9D) else chr(b)) for b in range(0x80, 0xA0)}
SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
SURROGATE_RE = re.compile("[\ud800-\udfff]")


def _unescape_entity(m: re.Match) -> str:
    text = m.group(0)
    if text in HTML_ENTITIES:
        return HTML_ENTITIES[text]
    if text.startswith("&#"):
        out = html.unescape(text)
        return text if ";" in out else out  # only a fully consumed numeric entity counts
    return text


def _fix_surrogates(text: str) -> str:
    if not SURROGATE_RE.search(text):
        return text

    def pair(m: re.Match) -> str:
        hi, lo = (ord(c) for c in m.group(0))
        return chr(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))

    return SURROGATE_RE.sub("\ufffd", SURROGATE_PAIR_RE.sub(pair, text))


def _fix_segment(text: str, unescape: bool) -> str:
    while True:
        before = text
        if unescape:
            text = HTML_ENTITY_RE.sub(_unescape_entity, text)
        text = C1_CONTROL_RE.sub(lambda m: _CP1252[ord(m.group(0))], text)
        text = text.translate(LIGATURES).translate(WIDTH_MAP)
        text = DOUBLE_QUOTE_RE.sub('"', SINGLE_QUOTE_RE.sub("'", text))
        text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n").replace("\x85", "\n")
        text = _fix_surrogates(text)
        text = ANSI_RE.sub("", text)
        text = text.translate(CONTROL_CHARS)
        text = unicodedata.normalize("NFC", text)
        if text == before:
            return text


def fix_text(text: str) -> str:
    """ftfy.fix_text with its defaults, minus mojibake repair (see the module docstring)."""
    if text.isascii() and not any(c in text for c in "&\x1b\r") and text.isprintable():
        return text  # the common case: nothing any step would change
    out, pos, unescape = [], 0, True
    while pos < len(text):
        end = text.find("\n", pos) + 1 or len(text)
        segment = text[pos:end]
        if "<" in segment:
            unescape = False  # ftfy's "auto": stays off for the rest of the text once a line has '<'
        out.append(_fix_segment(segment, unescape))
        pos = end
    return "".join(out)


# The `regex` module's \s (Unicode White_Space), which CLIP's whitespace clean-up uses; unlike
# str.isspace it does not include U+001C..U+001F.
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_WS_RUN = re.compile("[" + "".join(WHITESPACE) + "]+")


def whitespace_clean(text: str) -> str:
    return _WS_RUN.sub(" ", text).strip()


def clean(text: str) -> str:
    """What transformers' CLIPTokenizer feeds its pre-tokenizer."""
    return whitespace_clean(fix_text(text)).lower()
