"""Adapters on an existing export: LoRA / LyCORIS switched at run time without re-export, merged at
export, and Textual Inversion in reserved embedding rows. Images equal diffusers' with the same
adapter applied (PSNR >= 45 dB on uint8; fp32, same weights, scheduler and seed); switching is exact
(A -> B -> A and the empty set reproduce images bit for bit).

Oracles: diffusers' load_lora_weights (+ fuse_lora / set_adapters) for kohya and peft files,
load_textual_inversion for embeddings, and for LoHa / LoKr (which diffusers does not load) diffusers'
pipeline with ΔW merged into its torch modules by the formulas written out in this file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdtrt import Pipeline
from sdtrt.artifacts import open_model_dir
from sdtrt.cli import main as cli
from sdtrt.errors import SdtrtError
from tests.helpers import psnr, reference_pipeline, seeded
from tests.test_adapter_formats import family_config

MIN_PSNR = 45.0
CALL = {"steps": 4, "seed": 11, "negative_prompt": "blurry", "progress": False}
PROMPT = "a watercolor fox"


@pytest.fixture(scope="module")
def weights(tiny_model):
    from sdtrt.adapters import weights_for

    return weights_for(family_config(tiny_model))


@pytest.fixture(scope="module")
def pipe(tiny_onnx):
    p = Pipeline.load(tiny_onnx)
    yield p
    p.adapters.set_loras([])


def _attention_and_conv(weights) -> list[tuple[str, str]]:
    """Every attention projection of the UNet, one conv, and the text encoder's attention: (component, param)."""
    unet = [p for p in weights["unet"] if any(k in p for k in (".to_q.", ".to_k.", ".to_v.", ".to_out.0."))]
    text = [p for p in weights["text_encoder"] if "self_attn" in p]
    return [("unet", p) for p in unet] + [("unet", "down_blocks.0.resnets.0.conv1.weight")] + [("text_encoder", p) for p in text]


def factors(shape: tuple[int, ...], rank: int, seed: int, std: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) large enough that ΔW is of the order of W: the LoRA must change the picture a lot, or
    a pipeline that ignored it would still pass the 45 dB parity check."""
    g = torch.Generator().manual_seed(seed)
    down = torch.randn((rank, *shape[1:]), generator=g) * std
    up = torch.randn((shape[0], rank, *([1, 1] if len(shape) == 4 else [])), generator=g) * std
    return down, up


def kohya_lora(path: Path, weights, seed: int = 0, rank: int = 4, alpha: float = 2.0) -> Path:
    sd = {}
    for i, (component, param) in enumerate(_attention_and_conv(weights)):
        name = ("lora_unet_" if component == "unet" else "lora_te_") + param.removesuffix(".weight").replace(".", "_")
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = factors(weights[component][param], rank, seed * 1000 + i)
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def peft_lora(path: Path, weights, seed: int = 1, rank: int = 2) -> Path:
    """No alpha: scale 1, twice kohya_lora's alpha/rank, so the factors are smaller (a LoRA far stronger
    than the weights it adds to makes the tiny model chaotic: fp32 rounding then decides the picture)."""
    sd = {}
    for i, (component, param) in enumerate(_attention_and_conv(weights)):
        if param.endswith("conv1.weight"):
            continue
        key = f"{component}.{param.removesuffix('.weight')}"
        sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = factors(weights[component][param], rank, seed * 1000 + i, std=0.3)
    save_file(sd, str(path))
    return path


def _images(pipe, **kw):
    return pipe(PROMPT, **{**CALL, **kw}).images


def _oracle(model_dir, **kw):
    return reference_pipeline(model_dir, **kw)


def _their_images(pipe, **kw):
    return pipe(PROMPT, negative_prompt="blurry", num_inference_steps=CALL["steps"], generator=seeded(CALL["seed"]), **kw).images


def _same(ours, theirs):
    scores = [psnr(a, b) for a, b in zip(ours, theirs, strict=True)]
    assert all(s >= MIN_PSNR for s in scores), scores


# --- LoRA switched at run time -------------------------------------------------------------------------


@pytest.mark.parametrize("maker", [kohya_lora, peft_lora])
def test_lora_on_unet_and_text_encoder_matches_diffusers_fuse_lora(pipe, tiny_model, weights, tmp_path, maker):
    lora = maker(tmp_path / "style.safetensors", weights)
    pipe.set_loras([(lora, 0.8)])
    oracle = _oracle(tiny_model)
    oracle.load_lora_weights(str(tmp_path), weight_name=lora.name)
    oracle.fuse_lora(lora_scale=0.8)
    _same(_images(pipe), _their_images(oracle))
    base = _images(pipe.__class__.load(pipe.model.root))
    assert psnr(_images(pipe)[0], base[0]) < 35  # the LoRA really changes the picture (10 dB below the parity bar)


def test_two_loras_with_different_scales_match_diffusers_set_adapters(pipe, tiny_model, weights, tmp_path):
    a, b = kohya_lora(tmp_path / "a.safetensors", weights, seed=3), peft_lora(tmp_path / "b.safetensors", weights, seed=4)
    pipe.set_loras([(a, 0.5), (b, 1.2)])
    oracle = _oracle(tiny_model)
    oracle.load_lora_weights(str(tmp_path), weight_name=a.name, adapter_name="a")
    oracle.load_lora_weights(str(tmp_path), weight_name=b.name, adapter_name="b")
    oracle.set_adapters(["a", "b"], adapter_weights=[0.5, 1.2])
    _same(_images(pipe), _their_images(oracle))


def test_switching_recomputes_from_the_base_so_a_b_a_and_the_empty_set_are_exact(pipe, weights, tmp_path):
    a, b = kohya_lora(tmp_path / "a.safetensors", weights, seed=5), peft_lora(tmp_path / "b.safetensors", weights, seed=6)
    pipe.set_loras([])
    base = _images(pipe, output_type="tensor")
    pipe.set_loras([(a, 1.0)])
    first_a = pipe(PROMPT, **CALL, output_type="tensor").tensors
    pipe.set_loras([(b, 0.7)])
    pipe.set_loras([(a, 1.0)])
    assert torch.equal(pipe(PROMPT, **CALL, output_type="tensor").tensors, first_a)
    pipe.set_loras([])
    assert torch.equal(pipe(PROMPT, **CALL, output_type="tensor").tensors, pipe.__class__.load(pipe.model.root)(PROMPT, **CALL, output_type="tensor").tensors)
    del base


# --- LyCORIS -------------------------------------------------------------------------------------------


def _lycoris_file(path: Path, weights, kind: str) -> tuple[Path, dict]:
    """A LoHa or LoKr file over the UNet's attention projections, and the ΔW each means (written out here)."""
    g = torch.Generator().manual_seed(7)
    sd, deltas = {}, {}
    for component, param in _attention_and_conv(weights)[:12]:
        if component != "unet" or param.endswith("conv1.weight"):
            continue
        out_f, in_f = weights[component][param][:2]
        name = "lora_unet_" + param.removesuffix(".weight").replace(".", "_")
        if kind == "loha":
            rank, alpha = 4, 2.0
            w1a, w1b = torch.randn(out_f, rank, generator=g) * 0.2, torch.randn(rank, in_f, generator=g) * 0.2
            w2a, w2b = torch.randn(out_f, rank, generator=g) * 0.2, torch.randn(rank, in_f, generator=g) * 0.2
            sd.update({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a, f"{name}.hada_w2_b": w2b,
                       f"{name}.alpha": torch.tensor(alpha)})
            deltas[(component, param)] = (w1a @ w1b) * (w2a @ w2b) * (alpha / rank)
        else:  # LoKr: whole w1 (a small block) and whole w2, no factorisation -> scale 1
            w1 = torch.randn(2, 2, generator=g) * 0.3
            w2 = torch.randn(out_f // 2, in_f // 2, generator=g) * 0.3
            sd.update({f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2})
            deltas[(component, param)] = torch.kron(w1, w2)
    save_file(sd, str(path))
    return path, deltas


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_lycoris_matches_diffusers_with_the_formula_merged_into_its_modules(pipe, tiny_model, weights, tmp_path, kind):
    path, deltas = _lycoris_file(tmp_path / f"{kind}.safetensors", weights, kind)
    pipe.set_loras([(path, 0.6)])
    oracle = _oracle(tiny_model)
    with torch.no_grad():
        for (component, param), delta in deltas.items():
            getattr(oracle, component).get_parameter(param).add_(0.6 * delta)
    _same(_images(pipe), _their_images(oracle))


# --- merged at export --------------------------------------------------------------------------------


def test_lora_merged_at_export_matches_diffusers_and_is_recorded(tiny_model, weights, tmp_path, capsys):
    from sdtrt.files import file_sha256

    lora = kohya_lora(tmp_path / "style.safetensors", weights, seed=9)
    out = tmp_path / "onnx"
    assert cli(["export", str(tiny_model), "--out", str(out), "--lora", f"{lora}:0.6", "--no-progress"]) == 0
    meta = open_model_dir(out).meta
    assert [(a.sha256, a.scale) for a in meta.adapters] == [(file_sha256(lora), 0.6)]
    oracle = _oracle(tiny_model)
    oracle.load_lora_weights(str(tmp_path), weight_name=lora.name)
    oracle.fuse_lora(lora_scale=0.6)
    _same(_images(Pipeline.load(out)), _their_images(oracle))


# --- Textual Inversion ------------------------------------------------------------------------------


def test_textual_inversion_in_reserved_rows_matches_diffusers(tiny_onnx, tiny_model, tmp_path):
    path = tmp_path / "cat-style.safetensors"
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))  # two vectors: <cat>, <cat>_1
    save_file({"emb_params": vectors}, str(path))  # kohya layout
    ours = Pipeline.load(tiny_onnx)
    assert ours.load_textual_inversion(path, token="<cat>") == ["<cat>", "<cat>_1"]
    oracle = _oracle(tiny_model)
    oracle.load_textual_inversion(str(path), token="<cat>")
    prompt = "a <cat> in a garden"
    mine = ours(prompt, **CALL).images
    theirs = oracle(prompt, negative_prompt="blurry", num_inference_steps=CALL["steps"], generator=seeded(CALL["seed"])).images
    _same(mine, theirs)
    # the token has the ids after the vocabulary, and those rows hold the file's vectors
    from sdtrt.runtime.pipeline import _Text

    ids = ours.tokenizer.encode([prompt])
    assert ids[0, 1:6].tolist() == [320, 49408, 49409, 530, 320]
    plain = Pipeline.load(tiny_onnx)
    with_rows, zero_rows = _Text(ours).run("text_encoder", ids), _Text(plain).run("text_encoder", ids)
    assert (with_rows["text_embeddings"] - zero_rows["text_embeddings"]).abs().max() > 0.5


def test_embeddings_that_do_not_fit_the_reserved_rows_are_refused(tiny_onnx, tmp_path):
    ours = Pipeline.load(tiny_onnx)
    slots = ours.model.meta.embedding_slots
    path = tmp_path / "big.safetensors"
    save_file({"emb_params": torch.randn(slots + 1, 32)}, str(path))
    with pytest.raises(SdtrtError, match="--embedding-slots"):
        ours.load_textual_inversion(path, token="<big>")


# --- refusals leave the pipeline as it was --------------------------------------------------------------


def test_a_bad_adapter_is_refused_and_the_previous_weights_stay(pipe, weights, tiny_sdxl_model, tmp_path):
    from sdtrt.adapters import weights_for

    good = kohya_lora(tmp_path / "good.safetensors", weights, seed=12)
    pipe.set_loras([(good, 1.0)])
    before = pipe(PROMPT, **CALL, output_type="tensor").tensors
    sdxl_lora = kohya_lora(tmp_path / "xl.safetensors", weights_for(family_config(tiny_sdxl_model)), seed=1)
    nan = tmp_path / "nan.safetensors"
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.full((4, 32), float("nan")),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}
    save_file(sd, str(nan))
    pickled = tmp_path / "old.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, pickled)
    for bad, words in [(sdxl_lora, "match no weight"), (nan, "NaN"), (pickled, "pickle"), (tmp_path / "missing.safetensors", "missing")]:
        with pytest.raises(SdtrtError, match=words):
            pipe.set_loras([(good, 1.0), (bad, 1.0)])
    with pytest.raises(SdtrtError, match="finite"):
        pipe.set_loras([(good, float("nan"))])
    assert torch.equal(pipe(PROMPT, **CALL, output_type="tensor").tensors, before)


# --- the command line ----------------------------------------------------------------------------------


def test_generate_takes_loras_embeddings_and_a1111_lora_tags(tiny_onnx, weights, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    kohya_lora(loras / "ink.safetensors", weights, seed=21)
    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "owl.safetensors"))
    common = ["--model", str(tiny_onnx), "--steps", "3", "--seed", "5", "--no-progress"]
    assert cli(["generate", "an <owl>", *common, "--lora", f"{loras / 'ink.safetensors'}:0.5",
                "--embedding", f"{tmp_path / 'owl.safetensors'}:<owl>", "--out", str(tmp_path / "a.png")]) == 0
    assert cli(["generate", "an <owl> <lora:ink:0.5>", *common, "--prompt-syntax", "a1111", "--lora-dir", str(loras),
                "--embedding", f"{tmp_path / 'owl.safetensors'}:<owl>", "--out", str(tmp_path / "b.png")]) == 0
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))  # the tag is the flag, and is removed from the prompt
    assert "Lora hashes" in a.text["parameters"] or "ink" in a.text["parameters"]


@pytest.mark.parametrize("tag,words", [("<lora:../ink:1>", "--lora-dir"), ("<lora:nope:1>", "nope"), ("<lora:ink:x>", "scale")])
def test_bad_lora_tags_are_refused(tiny_onnx, weights, tmp_path, capsys, tag, words):
    loras = tmp_path / "loras"
    loras.mkdir()
    kohya_lora(loras / "ink.safetensors", weights)
    assert cli(["generate", f"a fox {tag}", "--model", str(tiny_onnx), "--prompt-syntax", "a1111", "--lora-dir", str(loras),
                "--steps", "2", "--out", str(tmp_path / "x.png"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


# --- SDXL ---------------------------------------------------------------------------------------------


def test_sdxl_lora_on_the_unet_and_both_text_encoders_matches_diffusers(tiny_sdxl_onnx, tiny_sdxl_model, tmp_path):
    from sdtrt.adapters import weights_for

    table = weights_for(family_config(tiny_sdxl_model))
    sd, i = {}, 0
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for param, shape in table[component].items():
            if any(k in param for k in (".to_q.", ".to_v.", "q_proj", "v_proj")):
                key = f"{component}.{param.removesuffix('.weight')}"
                sd[f"{key}.lora_A.weight"], sd[f"{key}.lora_B.weight"] = factors(shape, 2, i, std=0.3)
                i += 1
    lora = tmp_path / "xl.safetensors"
    save_file(sd, str(lora))
    ours = Pipeline.load(tiny_sdxl_onnx)
    ours.set_loras([(lora, 0.9)])
    oracle = reference_pipeline(tiny_sdxl_model, cls_name="StableDiffusionXLPipeline")
    oracle.load_lora_weights(str(tmp_path), weight_name=lora.name)
    oracle.fuse_lora(lora_scale=0.9)
    _same(_images(ours), _their_images(oracle))
    assert psnr(_images(ours)[0], _images(Pipeline.load(tiny_sdxl_onnx))[0]) < 35


def test_sdxl_embedding_fills_both_encoders_like_diffusers(tiny_sdxl_onnx, tiny_sdxl_model, tmp_path):
    g = torch.Generator().manual_seed(8)
    path = tmp_path / "style.safetensors"
    save_file({"clip_l": torch.randn(1, 32, generator=g), "clip_g": torch.randn(1, 32, generator=g)}, str(path))
    ours = Pipeline.load(tiny_sdxl_onnx)
    ours.load_textual_inversion(path, token="<s>")
    oracle = reference_pipeline(tiny_sdxl_model, cls_name="StableDiffusionXLPipeline")
    from safetensors.torch import load_file

    state = load_file(str(path))
    oracle.load_textual_inversion(state["clip_l"], token="<s>", text_encoder=oracle.text_encoder, tokenizer=oracle.tokenizer)
    oracle.load_textual_inversion(state["clip_g"], token="<s>", text_encoder=oracle.text_encoder_2, tokenizer=oracle.tokenizer_2)
    prompt = "a <s> fox"
    _same(ours(prompt, **CALL).images,
          oracle(prompt, negative_prompt="blurry", num_inference_steps=CALL["steps"], generator=seeded(CALL["seed"])).images)
