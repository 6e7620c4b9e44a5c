"""Presets write diffusers folders that diffusers loads, with the stated architectures."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from sdtrt.models.presets import PRESETS, build_components, clip_bpe_path, clip_vocab_and_merges, get_preset, make_model
from sdtrt.errors import SdtrtError


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_tiny_loads_in_diffusers_and_generates(tiny_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    assert pipe.text_encoder.config.vocab_size == 49408
    image = pipe("a fox", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    assert image.std() > 0.01  # a real picture, not a constant


def test_tiny_weights_are_safetensors_only(tiny_model):
    files = {p.suffix for p in tiny_model.rglob("*") if p.is_file()}
    assert ".safetensors" in files
    assert not files & {".bin", ".ckpt", ".pt", ".pth"}


@pytest.mark.parametrize("name,unet,text", [
    ("sd15", 859_520_964, 123_060_480),  # the published SD 1.5 counts
    ("sd21", 865_910_724, 340_387_840),  # the published SD 2.1 counts (OpenCLIP ViT-H text tower)
])
def test_full_size_presets_have_the_published_parameter_counts(name, unet, text):
    parts = build_components(get_preset(name), seed=0, device="meta")  # configs only, no weights materialized
    assert _params(parts["unet"]) == unet
    assert _params(parts["text_encoder"]) == text
    assert _params(parts["vae"]) == 83_653_863


@pytest.mark.parametrize("name", ["tiny-sd2", "tiny-inpaint"])
def test_other_tiny_presets_load_in_diffusers(name, tmp_path):
    import diffusers

    out = make_model(name, tmp_path / name)
    preset = PRESETS[name]
    pipe = getattr(diffusers, preset.pipeline_class).from_pretrained(out)
    assert pipe.unet.config.in_channels == preset.unet.get("in_channels", 4)
    assert pipe.tokenizer.pad_token == preset.pad_token


def test_vocabulary_is_the_real_clip_bpe():
    vocab, merges = clip_vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


PROMPTS = [
    "a photo of a cat",
    "A watercolor painting of a fox, trending on artstation, 4k",
    "Ünïcödé àccents and naïve café",
    "東京の夜景 and 🚀 emoji",
    "don't stop-believing!!! (masterpiece:1.2)",
    "",
]


def _openai_tokenizer():
    """OpenAI's own CLIP tokenizer as open_clip ships it (loaded without importing open_clip's vision deps)."""
    spec = importlib.util.spec_from_file_location("_openai_clip_tokenizer", clip_bpe_path().parent / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def test_tokenizer_files_give_transformers_the_openai_ids(tiny_model):
    from transformers import CLIPTokenizer

    ours = CLIPTokenizer.from_pretrained(tiny_model / "tokenizer")
    openai = _openai_tokenizer()
    for prompt in PROMPTS:
        assert ours(prompt).input_ids == [49406, *openai.encode(prompt), 49407], prompt
    # golden ids from the published openai/clip-vit-large-patch14 tokenizer
    assert ours("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_sd2_presets_pad_with_exclamation_mark_id_0(tmp_path):
    from transformers import CLIPTokenizer

    out = make_model("tiny-sd2", tmp_path / "m")
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    ids = tok("a cat", padding="max_length", max_length=77).input_ids
    assert ids[:4] == [49406, 320, 2368, 49407] and set(ids[4:]) == {0}
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"


def test_unknown_preset_lists_the_known_ones(tmp_path):
    with pytest.raises(SdtrtError, match="tiny, tiny-sd2"):
        make_model("sd3", tmp_path / "x")


def test_make_model_refuses_existing_output_without_force(tiny_model):
    with pytest.raises(SdtrtError, match="--force"):
        make_model("tiny", tiny_model)
