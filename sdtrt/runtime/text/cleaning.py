"""Prompt clean-up before CLIP's BPE: `ftfy.fix_text`, whitespace collapsed, lower-cased.

Parity target: transformers' CLIPTokenizer (the "slow" one that StableDiffusionPipeline loads) with
ftfy installed, whose `_tokenize` does `whitespace_clean(ftfy.fix_text(text)).lower()`. We call ftfy
itself (default configuration, as transformers does) rather than reimplement it: its mojibake repair
("cafÃ©" -> "café") is a statistical heuristic over encodings that only ftfy's own tables reproduce,
and a copy would drift with every ftfy release. ftfy is small, pure Python and a hard dependency.

transformers' fallback without ftfy (a BERT-style BasicTokenizer) gives other ids; we never use it.
OpenAI's reference CLIP tokenizer also runs html.unescape twice; transformers does not, and we follow
transformers, because diffusers' results come from it.
"""

from __future__ import annotations

import re

from ftfy import fix_text

# The `regex` module's \s (Unicode White_Space), which transformers' whitespace_clean uses; unlike
# str.isspace it does not include U+001C..U+001F.
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_WS_RUN = re.compile("[" + "".join(WHITESPACE) + "]+")


def whitespace_clean(text: str) -> str:
    return _WS_RUN.sub(" ", text).strip()


def clean(text: str) -> str:
    """What transformers' CLIPTokenizer feeds its pre-tokenizer."""
    return whitespace_clean(fix_text(text)).lower()
