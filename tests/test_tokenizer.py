"""The runtime tokenizer gives the ids diffusers gets from transformers' CLIPTokenizer for the same folder.

Target: transformers 4.57's CLIPTokenizer (the class StableDiffusionPipeline loads), with ftfy
installed: every prompt gets the same ids, mojibake included (both run ftfy.fix_text).
"""

from __future__ import annotations

import random

import pytest

from sdtrt.models.presets import write_tokenizer
from sdtrt.runtime.text.tokenizer import CLIPTokenizer

HAND_WRITTEN = [
    "", " ", "a", "a photo of a cat", "A Watercolor Painting of a FOX, trending on ArtStation, 4k, 8K UHD",
    "masterpiece, best quality, (detailed:1.2), [blurry], {braces}", "don't I'll we're you've I'm he'd 'S 'LL",
    "1234567890 3.14159 -42 1e10 ½ ² ³ ٣ ৩ Ⅻ", "東京の夜景、ネオン", "한국어 프롬프트", "中文提示词，高清",
    "😀🚀🔥👍🏽 emoji 🏳️‍🌈 flag", "Ünïcödé àccents naïve café résumé Øresund Ærø", "x&amp;y &lt;b&gt; &quot;q&quot; &#39;s &#x2019;",
    "&NTILDE; &ntilde; &nTILDE; &notit; &amp &copy;", "<b>bold</b> &amp; keep", "line one &amp;\n<line two> &amp;",
    "it’s “curly” ‘single’ „low“ ‹angle›", "ﬁsh ﬂower ĳssel ǅemal", "ＦＵＬＬ　ＷＩＤＴＨ ｶﾀｶﾅ", "tab\there\nnew\r\nline\u2028sep",
    "\x1b[31mred\x1b[0m text", "\x93quoted\x94 \x85 ellipsis", "zero\u200bwidth\ufeffbom", "a <|endoftext|> b <|startoftext|> c",
    "a <|ENDOFTEXT|> b", "!!! ??? ... --- ___ ***", "hello!! world!", "e-mail: someone@example.com, url https://x.y/z?q=1",
    "C++ and C# and F#", "snake_case camelCase kebab-case", "İstanbul ß STRASSE ſ", "\u0345x\u0345", "café" * 40,
    "word " * 100, "a" * 300, "Ⓐⓑ ㊗ ℃ ™ ©",
]


def _as_cp1252(text: str, times: int = 1) -> str:
    """Mojibake as it happens: UTF-8 bytes read as Windows-1252 (its 5 undefined bytes as Latin-1), `times` over."""
    for _ in range(times):
        text = "".join(bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in text.encode("utf-8"))
    return text


# ftfy repairs these; the ids must follow its repair exactly.
MOJIBAKE = [
    "cafÃ©", "Ã¼ber alles", "donâ€™t stop", "â€œquotedâ€\x9d", "cafÃ©\nline two â€” dash", "Ã\xa0 la carte",
    "Ã  la plage", "cafÃ© and café side by side", "Ã¼ber &amp; Ã¶ffentlich <b>tag</b>", "ÃƒÂ©tÃƒÂ©",
    _as_cp1252("naïve café résumé"), _as_cp1252("crème brûlée — “deluxe”"), _as_cp1252("東京の夜景、ネオン"),
    _as_cp1252("a café in 東京") + " 東京の夜景", _as_cp1252("😀 emoji 🔥"), _as_cp1252("Über Straße", 2),
    _as_cp1252("naïve", 3), "Ã\x86rÃ¸ Ã\x98resund", "seÃ±or piÃ±ata", "â€˜singleâ€™ and â€¦ ellipsis",
    "Ã© on its own", "â‚¬ sign",
]
# Text that looks like mojibake (or has its characters) but is not: ftfy leaves it, and so must we.
NOT_MOJIBAKE = [
    "ÂÊÎÔÛ circumflex caps", "Ä Ö Ü ä ö ü German umlauts", "£50 — €20 ¥100", "Hawaiʻi ʻōlelo", "Łódź Ñandú Øre",
    "naïve Æsir œuvre", "ÀÉÎÕÜ", "smörgåsbord", "Ã", "â€", "Â", "São Paulo Ñoño", "MÃE (Portuguese caps)",
    "ÂGE ÉTÉ", "Ça va à Paris",
]
FRAGMENTS = [
    "a portrait of", "an astronaut", "riding a horse", "on mars", "highly detailed", "8k", "by greg rutkowski",
    "(masterpiece:1.3)", "[low quality]", "東京", "😀", "naïve", "&amp;", "“quoted”", "1920s", "f/1.8", "50mm",
    "it's", "ＷＩＤＥ", "ﬁne", "<lora:x:0.5>", "--no text", "@artist", "#hashtag", "$100", "100%", "~ ^ |",
    "\t", "\n", "  ", "!", "!!", "?", "Ⅷ", "é", "e\u0301", "ª", "_under_score_", "cafÃ©", "â€œhiâ€\x9d",
]


def _generated(n: int = 300) -> list[str]:
    rng = random.Random(1234)
    return [" ".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 30))) for _ in range(n)]


PROMPTS = HAND_WRITTEN + MOJIBAKE + NOT_MOJIBAKE + _generated()


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["sd1-pads-with-eos", "sd2-pads-with-!"])
def tokenizer_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    write_tokenizer(folder, request.param)
    return folder


def test_ids_equal_transformers_for_hundreds_of_prompts(tokenizer_dir):
    from transformers import CLIPTokenizer as Reference

    reference = Reference.from_pretrained(tokenizer_dir)
    ours = CLIPTokenizer.from_dir(tokenizer_dir)
    assert reference.fix_text is not None, "the oracle needs ftfy installed (else it falls back to BERT's clean-up)"
    assert len(PROMPTS) >= 300 and len(MOJIBAKE) >= 15
    expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    got = ours.encode(PROMPTS).tolist()
    mismatches = [(p, e, g) for p, e, g in zip(PROMPTS, expected, got) if e != g]
    assert not mismatches, mismatches[:3]


def test_mojibake_is_repaired_as_ftfy_repairs_it(tokenizer_dir):
    ours = CLIPTokenizer.from_dir(tokenizer_dir)
    assert ours.token_ids("cafÃ©") == ours.token_ids("café")
    assert ours.token_ids("donâ€™t") == ours.token_ids("don't")


def test_shape_dtype_and_special_tokens(tokenizer_dir):
    ours = CLIPTokenizer.from_dir(tokenizer_dir)
    ids = ours.encode(["a cat", ""])
    assert ids.shape == (2, 77) and str(ids.dtype) == "torch.int64"
    assert ids[0, :4].tolist() == [49406, 320, 2368, 49407]
    assert ids[1, :2].tolist() == [49406, 49407]


def test_sd2_tokenizer_pads_with_id_0_and_splits_literal_exclamation_marks(tmp_path):
    write_tokenizer(tmp_path / "t", "!")
    ours = CLIPTokenizer.from_dir(tmp_path / "t")
    ids = ours.encode("wow!!").tolist()[0]
    # "!" is SD2's pad token, so transformers (and diffusers with it) splits it out as id 0
    assert ids[:5] == [49406, 2781, 0, 0, 49407] and set(ids[5:]) == {0}


def test_long_prompt_is_truncated_to_75_tokens_with_a_warning(tokenizer_dir, caplog):
    ours = CLIPTokenizer.from_dir(tokenizer_dir)
    ids = ours.encode("word " * 100)[0].tolist()
    assert ids[0] == 49406 and ids[76] == 49407 and len(ids) == 77
    [record] = caplog.records
    line = record.getMessage()
    # one short line (diffusers' warning repeats every dropped word: 10 KB for a long prompt)
    assert record.levelname == "WARNING" and "\n" not in line and len(line) < 300, line
    assert "100 tokens" in line and "75" in line and "dropped 'word word" in line and "--prompt-syntax a1111" in line


def test_digits_are_one_token_each(tokenizer_dir):
    ours = CLIPTokenizer.from_dir(tokenizer_dir)
    assert len(ours.token_ids("1234")) == 4


def test_words_are_bpe_encoded_once_then_served_from_the_cache(tokenizer_dir):
    ours = CLIPTokenizer.from_dir(tokenizer_dir)
    ours.encode("a watercolor fox")
    assert {"watercolor", "fox"} <= set(ours._cache)
    ours._cache["fox"] = (999,)  # a cached entry is what the next encode uses
    assert 999 in ours.encode("a watercolor fox")[0].tolist()
