"""Taiyi (Chinese Stable Diffusion: SD 1.x UNet/VAE + BERT text encoder + WordPiece tokenizer) through the
model-family layer.

Oracles: transformers' slow BertTokenizer (the class diffusers loads for Taiyi's tokenizer/ folder) for token
ids, called as diffusers calls it (padding="max_length", max_length=model_max_length, truncation=True); and
diffusers' StableDiffusionPipeline / Img2Img / Inpaint pipelines on the same tiny-taiyi folder for text
embeddings (to 1e-5) and images (PSNR >= 45 dB on uint8, fp32, same weights, scheduler and seed).

A note on what the image tests can see: Taiyi pads every prompt to 512 tokens and attends to the padding (as
diffusers does), so with random weights a prompt moves the tiny model's image only a little (two different
prompts: ~65 dB). The text path is therefore checked directly too: the UNet's text input equals diffusers'
`encode_prompt` for the same prompts, to 1e-5.
"""

from __future__ import annotations

import json
import random
import shutil
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt import Pipeline, Request
from sdtrt.artifacts import open_model_dir
from sdtrt.errors import SdtrtError
from sdtrt.models.presets import chinese_wordpiece_vocab, write_bert_tokenizer, write_tokenizer
from sdtrt.runtime.request import InvalidRequest
from sdtrt.runtime.text.factory import load_tokenizer
from sdtrt.runtime.text.tokenizer import CLIPTokenizer
from sdtrt.runtime.text.wordpiece import WordPieceTokenizer
from tests.helpers import psnr, reference_pipeline, seeded

MIN_PSNR = 45.0


# --- the tokenizer corpus ------------------------------------------------------------------------------

CHINESE = [
    "飞流直下三千尺，油画", "小桥流水人家，Van Gogh style。", "吃过桥米线的猫。", "穿着宇航服的哈士奇。", "君不见黄河之水天上来，唯美，油画",
    "滔滔江水，连绵不绝，唯美，插画", "长城，清晨，朦胧，唯美，插画", "梦回江南，中国古代小镇，唯美，插画", "云南苗家古寨，原始森林，鸟语花香，唯美，插画",
    "中国的未来城市，科幻插画", "一只可爱的小猫在草地上玩耍，高清，8K", "水墨画风格的山水，留白，意境深远", "赛博朋克风格的上海夜景，霓虹灯",
    "古风少女，汉服，樱花树下，工笔画", "宫崎骏风格的乡村小屋，夏天，蓝天白云", "敦煌壁画，飞天，金色，细节丰富", "一碗热气腾腾的兰州拉面",
]
MIXED = [
    "一只cat在sofa上睡觉", "画一个robot，cyberpunk风格，4k高清", "Taiyi太乙Stable Diffusion中文模型", "iPhone15拍摄的北京胡同",
    "by 齐白石 and Monet, oil painting 油画", "3D渲染，C4D，octane render，blender", "GPT-4和ChatGPT的logo", "NASA宇航员在月球上",
    "ＡＩ绘画：ｓｔａｂｌｅ ｄｉｆｆｕｓｉｏｎ", "e-mail: someone@example.com 邮箱", "URL https://x.y/z?q=1&r=2 网址", "don't stop 不要停",
]
PUNCTUATION = [
    "，。！？；：“”‘’（）【】《》、…—～·", ",.!?;:\"'()[]<>{}", "你好！你好!你好？你好?", "「引用」『二重』〈单〉《双》",
    "价格：￥100，折扣50％", "……——～～", "！！！？？？。。。", "(括号) （全角括号） [方] 【黑方】", "#话题# @某人 $100 %50 ^_^ &&",
    "〇一二三 零壹贰叁", "※注意※ ★☆ ♡♥ →←↑↓", "¿Qué? ¡Hola! «guillemets» „low“", "a–b—c ‒ ― ‐", "™ © ® ℃ ℉ ‰ №",
]
FULL_WIDTH = [
    "ＡＢＣＤＥＦＧ　ａｂｃｄｅｆｇ", "０１２３４５６７８９", "Ｈｅｌｌｏ，Ｗｏｒｌｄ！", "ｓｔｙｌｅ：ｏｉｌ　ｐａｉｎｔｉｎｇ", "１９２０年代的上海滩",
    "ｶﾀｶﾅ ﾊﾝｶｸ (half-width katakana)", "３Ｄ模型，４Ｋ，ＨＤＲ", "Ⅰ Ⅱ Ⅲ Ⅻ ⅰⅱ ① ② ⑩ ⑴", "ＦＵＬＬ　ＷＩＤＴＨ",
]
TRADITIONAL = ["繁體中文提示詞，高畫質", "龍鳳呈祥，國畫", "臺灣的夜市，燈籠，熱鬧", "香港維多利亞港夜景", "學習與藝術，書法作品", "鬱蔥蔥的森林，霧氣繚繞"]
KANA = ["東京の夜景、ネオン", "ひらがなとカタカナ", "アニメ風の女の子、桜", "富士山と新幹線、浮世絵", "ラーメン🍜おいしい", "ヴァイオリン ヴィ ヴ ゔ"]
HANGUL = ["한국어 프롬프트", "서울의 밤, 네온사인", "김치찌개 맛있다", "ㄱㄴㄷㄹ ㅏㅑㅓㅕ", "\u1112\u1161\u11ab\u1100\u116e\u11a8", "한국 and 中国 and 日本"]
EMOJI = ["😀🚀🔥👍🏽 emoji", "🏳️‍🌈 flag", "❤️ 心", "👨‍👩‍👧‍👦 family", "🐱🐶🦊 动物", "🌸🌸🌸 樱花", "🇨🇳🇯🇵 flags", "☺ ☻ ✌ ✨"]
ACCENTS = [
    "Ünïcödé àccents naïve café résumé Øresund Ærø", "İstanbul ß STRASSE ſ", "ΣΑΣ ΟΔΟΣ Ὀδυσσεύς", "ǅemal ǈ ǋ ǲ", "ﬁsh ﬂower ĳssel",
    "crème brûlée façade Noël", "Łódź Ñandú Hawaiʻi", "e\u0301 A\u030a o\u0308", "Ａ\u0301 全\u0301", "ÀÉÎÕÜ àéîõü", "Moscow Москва МОСКВА",
    "Ελληνικά ελληνικά", "Tiếng Việt có dấu", "עברית العربية", "हिन्दी ไทย",
]
CJK_EXTENSIONS = [
    "𠀀𠀁𠀂 扩展B", "㐀㑇㒀 扩展A", "豈更車 兼容", "𪚥 四龙", "𰀀𰀁 扩展G", "\U0002EBF0 扩展I", "⺀⺁ ⼀⼁ 部首", "㈠㈡ ㊀㊁ ㍻", "〆〇 々",
    "\U0002F800\U0002F801 兼容补充", "\U00020000abc\U00020001", "龘靐齉 生僻字",
]
ODD_WHITESPACE = [
    "tab\there", "全角\u3000空格", "no\u00a0break", "zero\u200bwidth", "join\u200dzwj", "bom\ufeffmark", "bell\x07char",
    "nul\x00char", "repl\ufffdchar", "line\u2028sep", "para\u2029sep", "info\x1cseps\x1f", "nel\x85next", "crlf\r\nline", "em\u2003space",
    "thin\u2009space", "\t\t\n\n  ", "  前后空格  ", "\u3000\u3000", "\x1b[31m红色\x1b[0m", "soft\u00adhyphen", "lrm\u200emark",
    "private\ue000use", "unassigned\u0378x", "word\u2060joiner", "vs\ufe0fsel", "mongolian\u180evs",
]
SPECIAL_TOKENS = ["[CLS] [SEP] [PAD] [MASK] [UNK]", "[cls] [Sep] [mask]", "x[MASK]y", "[unused1] [unused99]", "<S> <T>", "[CLS][CLS]",
                  "[ CLS ]", "[MASK]."]
EMPTY = ["", " ", "\u3000", "\u200b", "\n", "\t", "，", "\x00"]
LONG = ["山水画，" * 300, "a" * 150, "x" * 100, "y" * 101, "word " * 600, "猫" * 520, "中文 English " * 200,
        "masterpiece, best quality, " * 100, "🐱" * 600, "ＡＢＣ" * 50]
FRAGMENTS = [
    "一只猫", "油画", "水彩", "高清", "8k", "4K", "，", "。", "！", "?", "masterpiece", "best quality", "(杰作:1.2)", "[模糊]",
    "東京", "ネオン", "한국", "😀", "café", "ＡＢＣ", "１２３", "\u3000", "\t", "\u200b", "van gogh", "by 齐白石", "𠀀", "「」", "……",
    "Σ", "İ", "ß", "e\u0301", "[MASK]", "[cls]", "co-op", "don't", "3.14", "50%", "#tag", "f/1.8", "ﬁ", "Ⅻ", "ﾊﾝｶｸ", "繁體", "龍",
]


def _generated(n: int = 250) -> list[str]:
    rng = random.Random(2024)
    return [rng.choice(["", " ", "，", ", ", "\u3000"]).join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 25))) for _ in range(n)]


PROMPTS = (CHINESE + MIXED + PUNCTUATION + FULL_WIDTH + TRADITIONAL + KANA + HANGUL + EMOJI + ACCENTS + CJK_EXTENSIONS
           + ODD_WHITESPACE + SPECIAL_TOKENS + EMPTY + LONG + _generated())


def _reference(folder, fast: bool = False):
    import transformers

    cls = transformers.BertTokenizerFast if fast else transformers.BertTokenizer
    return cls.from_pretrained(folder)


def _diffusers_ids(reference, prompts: list[str]) -> list[list[int]]:
    """What StableDiffusionPipeline.encode_prompt feeds the text encoder."""
    return reference(prompts, padding="max_length", max_length=reference.model_max_length, truncation=True).input_ids


# Taiyi's settings first; then the other BertTokenizer options a Chinese/English checkpoint may set.
SETTINGS = {
    "taiyi": {"do_lower_case": True, "model_max_length": 512},
    "cased": {"do_lower_case": False, "model_max_length": 512},
    "lower-keep-accents": {"do_lower_case": True, "strip_accents": False, "model_max_length": 512},
    "cased-strip-accents": {"do_lower_case": False, "strip_accents": True, "model_max_length": 512},
    "no-chinese-split": {"do_lower_case": True, "tokenize_chinese_chars": False, "model_max_length": 512},
    "no-basic-tokenizer": {"do_lower_case": True, "do_basic_tokenize": False, "model_max_length": 512},
    "never-split-77": {"do_lower_case": True, "never_split": ["[unused1]", "Van"], "model_max_length": 77},
}


@pytest.fixture(scope="module", params=list(SETTINGS), ids=list(SETTINGS))
def bert_tokenizer_dir(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert") / "tokenizer"
    write_bert_tokenizer(folder, SETTINGS[request.param])
    return folder


def test_the_corpus_covers_what_chinese_prompts_hold():
    assert len(PROMPTS) >= 300 and len(set(PROMPTS)) > 390
    assert any(len(p) > 1000 for p in PROMPTS) and "" in PROMPTS
    assert any("\u3000" in p for p in PROMPTS) and any("\u200b" in p for p in PROMPTS) and any("\x07" in p for p in PROMPTS)


def test_ids_equal_transformers_bert_tokenizer_for_hundreds_of_prompts(bert_tokenizer_dir, caplog):
    reference = _reference(bert_tokenizer_dir)
    ours = WordPieceTokenizer.from_dir(bert_tokenizer_dir)
    expected = _diffusers_ids(reference, PROMPTS)
    got = ours.encode(PROMPTS)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), reference.model_max_length)
    bad = [p for p, a, b in zip(PROMPTS, expected, got.tolist()) if a != b]
    assert not bad, f"{len(bad)} prompts differ, e.g. {bad[:3]!r}"


def test_the_fast_tokenizer_agrees_except_on_characters_python_does_not_know(tmp_path):
    """BertTokenizerFast (Rust) gives the same ids on the corpus, except for characters Python 3.11's Unicode
    tables call unassigned (Cn): the slow tokenizer - diffusers' - deletes them as control characters, the
    fast one keeps them (U+2EBF0 is a CJK extension I ideograph since Unicode 15.1)."""
    write_bert_tokenizer(tmp_path / "tok", SETTINGS["taiyi"])
    slow, fast = _diffusers_ids(_reference(tmp_path / "tok"), PROMPTS), _diffusers_ids(_reference(tmp_path / "tok", fast=True), PROMPTS)
    differ = [p for p, a, b in zip(PROMPTS, slow, fast) if a != b]
    unknown = [p for p in PROMPTS if any(unicodedata.category(c) == "Cn" for c in p)]
    assert differ == unknown and len(differ) == 2, differ


def test_every_cjk_character_is_its_own_token_and_the_rest_follows_bert(tmp_path):
    write_bert_tokenizer(tmp_path / "tok", SETTINGS["taiyi"])
    tok = WordPieceTokenizer.from_dir(tmp_path / "tok")
    vocab = {i: t for t, i in tok.vocab.items()}
    pieces = lambda text: [vocab[i] for i in tok.token_ids(text)]  # noqa: E731
    assert pieces("飞流直下三千尺，油画") == list("飞流直下三千尺，油画")
    assert pieces("小桥流水，Van Gogh") == ["小", "桥", "流", "水", "，", "van", "gogh"]  # lower-cased
    assert pieces("Café ΣΑΣ") == ["c", "##a", "##f", "##e", "σ", "##α", "##σ"]  # accents stripped; sigma lowered char by char
    assert pieces("ネオン") == ["ネ", "##オ", "##ン"]  # kana is not in BERT's CJK ranges: one word, '##' pieces
    assert pieces("zero\u200bwidth\u3000x") == pieces("zerowidth x")  # zero-width removed, ideographic space splits
    assert pieces("[CLS] [cls]") == ["[CLS]", "[", "c", "##l", "##s", "]"]  # special tokens only as written
    assert pieces("😀 🦊") == ["😀", "[UNK]"] and pieces("a" * 101) == ["[UNK]"]


def test_the_vocabulary_has_bert_chinese_structure():
    vocab = chinese_wordpiece_vocab()
    assert vocab[:2] == ["[PAD]", "[unused1]"] and vocab[99] == "[unused99]"
    assert vocab[100:104] == ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # bert-base-chinese's special ids
    assert {chr(c) for c in range(0x4E00, 0xA000)} <= set(vocab)  # every CJK Unified Ideograph
    assert {"𠀀", "㐀", "豈", "，", "。", "##a", "##9", "##ン", "ｂ", "##ｂ"} <= set(vocab)
    assert len(vocab) == len(set(vocab))


def test_long_prompts_are_truncated_to_the_window_with_one_warning(tmp_path, caplog):
    write_bert_tokenizer(tmp_path / "tok", SETTINGS["taiyi"])
    tok = WordPieceTokenizer.from_dir(tmp_path / "tok")
    with caplog.at_level("WARNING", logger="sdtrt"):
        ids = tok.encode(["山水画，" * 300])
    assert ids.shape == (1, 512) and ids[0, -1].item() == tok.eos_id and (ids != tok.pad_id).all()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "1200 tokens" in lines[0] and "510" in lines[0]


def test_the_tokenizer_is_chosen_from_the_folders_files(tmp_path):
    write_tokenizer(tmp_path / "clip", "<|endoftext|>")
    write_bert_tokenizer(tmp_path / "bert", SETTINGS["taiyi"])
    clip, bert = load_tokenizer(tmp_path / "clip"), load_tokenizer(tmp_path / "bert")
    assert isinstance(clip, CLIPTokenizer) and isinstance(bert, WordPieceTokenizer)
    assert clip.encode(["一只猫", "a cat"]).shape == (2, 77) and bert.encode(["一只猫", "a cat"]).shape == (2, 512)
    (tmp_path / "none").mkdir()
    with pytest.raises(SdtrtError, match="vocab.json \\+ merges.txt .*vocab.txt"):
        load_tokenizer(tmp_path / "none")


# --- the family, the real folder layout, export -------------------------------------------------------------


def test_the_family_comes_from_the_text_encoder_class_and_the_contract_from_the_configs(tiny_taiyi_onnx, tiny_onnx):
    model = open_model_dir(tiny_taiyi_onnx)
    assert model.meta.family == "taiyi" and model.meta.pipeline_class == "StableDiffusionPipeline"
    assert open_model_dir(tiny_onnx).meta.family == "sd"  # the same pipeline class with CLIP stays SD
    specs = model.specs
    assert [(t.name, t.dims, t.dtype) for t in specs["text_encoder"].inputs] == [("input_ids", ("T", 512), "int32")]
    assert [(t.name, t.dims) for t in specs["text_encoder"].outputs] == [("text_embeddings", ("T", 512, 32))]
    assert specs["unet"].tensor("encoder_hidden_states").dims == ("B2", 512, 32)  # the text axis is the tokenizer's length
    assert model.meta.tokenizers["text_encoder"].files == ["special_tokens_map.json", "tokenizer_config.json", "vocab.txt"]
    assert all(row["ok"] for row in model.meta.validation)


def _as_published(folder):
    """Rewrite a tiny-taiyi folder's metadata the way IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-v0.1 has it:
    an older diffusers' model_index (safety checker and feature extractor named), a BertTokenizer config from
    before added_tokens_decoder existed (special_tokens_map.json carries the specials), the BERT config keys
    of a Chinese RoBERTa-wwm checkpoint."""
    index = json.loads((folder / "model_index.json").read_text())
    index.update({"_diffusers_version": "0.6.0", "feature_extractor": ["transformers", "CLIPFeatureExtractor"],
                  "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"]})
    index.pop("image_encoder", None)
    index.pop("requires_safety_checker", None)
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({
        "cls_token": "[CLS]", "do_basic_tokenize": True, "do_lower_case": True, "mask_token": "[MASK]", "model_max_length": 512,
        "name_or_path": "IDEA-CCNL/Taiyi-Stable-Diffusion-1B-Chinese-v0.1", "never_split": None, "pad_token": "[PAD]",
        "sep_token": "[SEP]", "special_tokens_map_file": None, "strip_accents": None, "tokenize_chinese_chars": True,
        "tokenizer_class": "BertTokenizer", "unk_token": "[UNK]"}))
    (folder / "tokenizer" / "special_tokens_map.json").write_text(json.dumps(
        {"cls_token": "[CLS]", "mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]", "unk_token": "[UNK]"}))
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    config.update({"_name_or_path": "IDEA-CCNL/Taiyi-CLIP-RoBERTa-102M-ViT-L-Chinese", "bos_token_id": 0, "eos_token_id": 2,
                   "output_past": True, "torch_dtype": "float32", "transformers_version": "4.24.0"})
    config.pop("dtype", None)
    (folder / "text_encoder" / "config.json").write_text(json.dumps(config))
    return folder


def test_a_folder_laid_out_like_the_published_taiyi_loads_as_it_is(tiny_taiyi_model, tmp_path):
    from sdtrt.export import export_model
    from sdtrt.export.source import inspect_source

    folder = _as_published(shutil.copytree(tiny_taiyi_model, tmp_path / "Taiyi-Stable-Diffusion-1B-Chinese-v0.1"))
    src = inspect_source(folder)
    assert src.family.name == "taiyi" and src.config["tokenizer"] == {"model_max_length": 512, "pad_token_id": 0}
    reference, ours = _reference(folder / "tokenizer"), WordPieceTokenizer.from_dir(folder / "tokenizer")
    assert ours.encode(PROMPTS).tolist() == _diffusers_ids(reference, PROMPTS)
    out = export_model(folder, tmp_path / "onnx", show_progress=False, log=lambda *_: None)
    assert open_model_dir(out).meta.family == "taiyi"
    image = Pipeline.load(out)("飞流直下三千尺，油画", steps=2, seed=1, progress=False).images[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize("edit,message", [
    (lambda f: (f / "tokenizer" / "vocab.txt").unlink(), "lacks vocab.txt"),
    (lambda f: _edit_json(f / "tokenizer" / "tokenizer_config.json", model_max_length=None), "model_max_length None"),
    (lambda f: _edit_json(f / "tokenizer" / "tokenizer_config.json", model_max_length=1024), "model_max_length 1024"),
])
def test_a_broken_taiyi_folder_is_refused_naming_the_file(tiny_taiyi_model, tmp_path, edit, message):
    from sdtrt.export.source import inspect_source

    folder = shutil.copytree(tiny_taiyi_model, tmp_path / "m")
    edit(folder)
    with pytest.raises(SdtrtError, match=message):
        inspect_source(folder)


def _edit_json(path, **values):
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))


# --- parity with diffusers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_taiyi_onnx):
    return Pipeline.load(tiny_taiyi_onnx)


@pytest.fixture(scope="module")
def oracle(tiny_taiyi_model):
    return reference_pipeline(tiny_taiyi_model)


def _same(ours, theirs) -> list[float]:
    scores = [psnr(a, b) for a, b in zip(ours, theirs, strict=True)]
    assert all(s >= MIN_PSNR for s in scores), scores
    return scores


PAIR = ["飞流直下三千尺，油画", "小桥流水人家，Van Gogh style。"]
NEGATIVES = ["模糊，低质量，水印", "丑陋，畸形"]


def test_pipe_tokenizer_encodes_to_the_models_window(pipe):
    ids = pipe.tokenizer.encode(PAIR)
    assert isinstance(pipe.tokenizer, WordPieceTokenizer) and ids.dtype == torch.long and ids.shape == (2, 512)


@pytest.mark.parametrize("prompt,negative,n", [(PAIR, NEGATIVES, 2), ("吃过桥米线的猫。", None, 1), ("", "模糊", 1)])
def test_the_unet_text_input_equals_diffusers_encode_prompt(pipe, oracle, prompt, negative, n):
    from sdtrt.runtime.pipeline import _Text

    request = Request(prompt, negative, num_images_per_prompt=n, guidance_scale=7.5, height=64, width=64)
    ours = pipe.family.conditioning(_Text(pipe), request, pipe.config)["encoder_hidden_states"]
    with torch.no_grad():
        cond, uncond = oracle.encode_prompt(prompt, "cpu", n, True, negative)
    assert ours.shape == (2 * n * (len(prompt) if isinstance(prompt, list) else 1), 512, 32)
    torch.testing.assert_close(ours, torch.cat([uncond, cond]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prompt,kwargs", [
    (PAIR, {"negative_prompt": NEGATIVES, "num_images_per_prompt": 2}),  # a batch of Chinese prompts, several images each
    ("穿着宇航服的哈士奇", {"negative_prompt": "模糊", "scheduler": "dpmpp_2m_karras"}),
    ("一只猫", {"guidance_scale": 1.0, "height": 48, "width": 80}),  # guidance off, non-square
])
def test_txt2img_matches_diffusers(pipe, tiny_taiyi_model, prompt, kwargs):
    oracle = reference_pipeline(tiny_taiyi_model, kwargs.get("scheduler"))
    theirs_kw = {k: v for k, v in kwargs.items() if k != "scheduler"}
    ours = pipe(prompt, steps=4, seed=3, progress=False, **kwargs).images
    _same(ours, oracle(prompt, num_inference_steps=4, generator=seeded(3), **theirs_kw).images)


def _picture() -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))


def _mask() -> Image.Image:
    return Image.fromarray(np.repeat(((np.arange(64) > 30) * 255).astype(np.uint8)[None, :], 64, axis=0))


def test_img2img_matches_diffusers(pipe, tiny_taiyi_model):
    oracle = reference_pipeline(tiny_taiyi_model, cls_name="StableDiffusionImg2ImgPipeline")
    kw = {"negative_prompt": "模糊", "strength": 0.6, "num_images_per_prompt": 2}
    ours = pipe("水墨画风格的山水", image=_picture(), steps=6, seed=5, progress=False, **kw).images
    _same(ours, oracle("水墨画风格的山水", image=_picture(), num_inference_steps=6, generator=seeded(5), **kw).images)


def test_inpainting_matches_diffusers(pipe, tiny_taiyi_model):
    oracle = reference_pipeline(tiny_taiyi_model, cls_name="StableDiffusionInpaintPipeline")
    ours = pipe("一只猫", image=_picture(), mask_image=_mask(), negative_prompt="模糊", steps=6, seed=5, progress=False).images
    _same(ours, oracle("一只猫", image=_picture(), mask_image=_mask(), negative_prompt="模糊", num_inference_steps=6,
                       generator=seeded(5)).images)


def test_an_attention_mask_is_rebuilt_in_the_graph_when_the_config_asks(tiny_taiyi_model, tmp_path):
    """use_attention_mask: true makes diffusers pass the tokenizer's mask; the exported graph derives the same
    mask from the ids (1 through the closing [SEP]), so text inputs still equal diffusers'."""
    from sdtrt.export import export_model
    from sdtrt.runtime.pipeline import _Text

    folder = shutil.copytree(tiny_taiyi_model, tmp_path / "masked")
    _edit_json(folder / "text_encoder" / "config.json", use_attention_mask=True)
    out = export_model(folder, tmp_path / "onnx", components=["text_encoder"], show_progress=False, log=lambda *_: None)
    pipe = Pipeline.load(out)
    oracle = reference_pipeline(folder)
    prompts = ["一只猫 [PAD] [SEP] 在睡觉", "山水画，" * 200]  # a literal [PAD]/[SEP] inside; a truncated prompt
    request = Request(prompts, ["模糊", ""], guidance_scale=7.5, height=64, width=64)
    ours = pipe.family.conditioning(_Text(pipe), request, pipe.config)["encoder_hidden_states"]
    with torch.no_grad():
        cond, uncond = oracle.encode_prompt(prompts, "cpu", 1, True, ["模糊", ""])
        unmasked = oracle.text_encoder(oracle.tokenizer(["模糊"], padding="max_length", max_length=512, return_tensors="pt").input_ids)[0]
    torch.testing.assert_close(ours, torch.cat([uncond, cond]), atol=1e-5, rtol=1e-5)
    assert (ours[0] - unmasked[0]).abs().max() > 1e-3  # the mask changed the embeddings: the test can fail


# --- refusals ---------------------------------------------------------------------------------------------


def test_clip_skip_is_refused_for_bert(pipe):
    with pytest.raises(InvalidRequest, match="clip_skip=2 is not defined for Taiyi's BERT") as e:
        pipe("一只猫", clip_skip=2, steps=2, progress=False)
    assert e.value.fix == "leave clip_skip out (None)"


def test_a1111_prompt_syntax_is_refused_for_wordpiece_naming_the_parameter(pipe, tiny_taiyi_onnx, tmp_path, capsys):
    with pytest.raises(InvalidRequest, match="prompt_syntax='a1111' is for CLIP's 77-token window") as e:
        pipe("(一只猫:1.3)", prompt_syntax="a1111", steps=2, progress=False)
    assert e.value.param == "prompt_syntax" and "prompt_syntax='plain'" in e.value.fix
    from sdtrt.cli import main as cli

    code = cli(["generate", "(一只猫:1.3)", "--model", str(tiny_taiyi_onnx), "--prompt-syntax", "a1111", "--steps", "2",
                "--no-progress", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "--prompt-syntax a1111" in err and "--prompt-syntax plain" in err and not (tmp_path / "x.png").exists()


def test_a_textual_inversion_embedding_is_refused_and_leaves_nothing_loaded(pipe, tmp_path):
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "owl.safetensors"))
    with pytest.raises(SdtrtError, match="WordPiece"):
        pipe.adapters.load_embedding(tmp_path / "owl.safetensors")
    assert pipe.adapters.embeddings == {}
    pipe.adapters.set_loras([])  # nothing half-loaded for a later weight change to trip on


def test_a_kohya_lora_on_the_unet_and_the_bert_matches_the_weights_merged_into_diffusers(tiny_taiyi_onnx, tiny_taiyi_model, tmp_path):
    """diffusers' LoRA loader only knows CLIP text encoders, so the oracle merges W + scale·(alpha/rank)·up·down
    into diffusers' own modules by hand: what is checked is that kohya's BERT names reach the right weights."""
    from safetensors.torch import save_file

    from sdtrt.adapters import weights_for
    from tests.test_adapter_formats import family_config

    weights = weights_for(family_config(tiny_taiyi_model))
    chosen = [("unet", p) for p in weights["unet"] if ".to_q." in p or ".to_v." in p]
    chosen += [("text_encoder", p) for p in weights["text_encoder"] if ".attention.self." in p or ".output.dense." in p]
    rank, alpha, scale, g, sd, deltas = 4, 2.0, 0.8, torch.Generator().manual_seed(3), {}, {}
    for component, param in chosen:
        out_f, in_f = weights[component][param][:2]
        down, up = torch.randn(rank, in_f, generator=g) * 0.5, torch.randn(out_f, rank, generator=g) * 0.5
        name = ("lora_unet_" if component == "unet" else "lora_te_") + param.removesuffix(".weight").replace(".", "_")
        sd |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
        deltas[(component, param)] = scale * alpha / rank * (up @ down)
    save_file(sd, str(tmp_path / "style.safetensors"))

    ours = Pipeline.load(tiny_taiyi_onnx)
    before = ours(PAIR[0], steps=3, seed=5, progress=False).images[0]
    ours.set_loras([(tmp_path / "style.safetensors", scale)])
    oracle = reference_pipeline(tiny_taiyi_model)
    with torch.no_grad():
        for (component, param), delta in deltas.items():
            getattr(oracle, component).get_parameter(param).add_(delta)
    after = ours(PAIR[0], steps=3, seed=5, progress=False).images[0]
    theirs = oracle(PAIR[0], num_inference_steps=3, generator=seeded(5)).images[0]
    _same([after], [theirs])
    assert psnr(after, before) < 40  # the LoRA changed the picture: the check can fail

    # the BERT half on its own, where its effect is not diluted by 512 mostly-padding tokens
    from sdtrt.runtime.pipeline import _Text

    request = Request(PAIR[0], None, guidance_scale=7.5, height=64, width=64)
    text = ours.family.conditioning(_Text(ours), request, ours.config)["encoder_hidden_states"]
    with torch.no_grad():
        cond, uncond = oracle.encode_prompt(PAIR[0], "cpu", 1, True, None)
        plain = reference_pipeline(tiny_taiyi_model).encode_prompt(PAIR[0], "cpu", 1, True, None)[0]
    torch.testing.assert_close(text, torch.cat([uncond, cond]), atol=1e-4, rtol=1e-4)
    assert (cond - plain).abs().max() > 0.1  # the BERT LoRA moved the embeddings


def test_brackets_are_plain_text_as_in_diffusers(pipe, oracle):
    ours = pipe("(一只猫:1.3), [模糊]", steps=3, seed=2, progress=False).images
    _same(ours, oracle("(一只猫:1.3), [模糊]", num_inference_steps=3, generator=seeded(2)).images)


# --- engines ---------------------------------------------------------------------------------------------


def test_tiny_taiyi_builds_tensorrt_rtx_engines_with_a_512_token_text_axis(tiny_taiyi_onnx, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="engine builds need the tensorrt-rtx package")
    from sdtrt.engines.build import build_engines

    out = build_engines(tiny_taiyi_onnx, tmp_path / "e", target="sm89", components=["text_encoder", "unet"], batch="1:1:2",
                        height="64", width="64", cache=tmp_path / "cache", show_progress=False, log=lambda *_: None)
    engines = open_model_dir(out).manifest.engines
    assert engines["text_encoder"].profile["input_ids"] == [[1, 512], [2, 512], [4, 512]]  # prompts + negatives
    assert engines["unet"].profile["encoder_hidden_states"] == [[1, 512, 32], [2, 512, 32], [4, 512, 32]]
