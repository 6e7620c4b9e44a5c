"""Stable unCLIP image variations through the model-family layer: preset (CLIP image encoder, image normalizer,
image noising scheduler), export contract (`image_encoder` component, UNet class labels of 2 x the embedding
width), CLIPImageProcessor reproduced in torch, TensorRT-RTX engines, and images equal to diffusers'
StableUnCLIPImg2ImgPipeline on the same tiny-unclip folder.

Tolerances: PSNR >= 45 dB on the uint8 images (fp32 ONNX Runtime against fp32 torch; same weights, scheduler and
seed; measured 80-86 dB or identical); the UNet's class labels equal diffusers' `_encode_image` to 1e-5 (the image path checked
directly: float32 ONNX against torch, normalizer and DDPM noise in float32); the processor equals transformers' to
1e-6. The image must matter: a differently coloured image moves the picture far below the bar (random-weight CLIP
encoders map random-noise pictures to nearly one embedding, so the test pictures differ in colour).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt import Pipeline, Request
from sdtrt.artifacts import open_model_dir
from sdtrt.cli import main as cli
from sdtrt.errors import SdtrtError
from sdtrt.runtime.image_processors import clip_pixels
from tests.helpers import psnr, reference_pipeline, seeded

MIN_PSNR = 45.0
UNCLIP = "StableUnCLIPImg2ImgPipeline"


@pytest.fixture(scope="module")
def pipe(tiny_unclip_onnx):
    return Pipeline.load(tiny_unclip_onnx)


@pytest.fixture(scope="module")
def oracle(tiny_unclip_model):
    return reference_pipeline(tiny_unclip_model, cls_name=UNCLIP)


def _picture(seed: int, tint=(120, 0, 0), width: int = 60, height: int = 45) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 128, (max(2, height // 4), max(2, width // 4), 3)).astype(np.int32) + np.array(tint)
    return Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)


RED, BLUE = (120, 0, 0), (0, 0, 120)


def _same(ours, theirs) -> list[float]:
    scores = [psnr(a, b) for a, b in zip(ours, theirs, strict=True)]
    print("PSNR dB:", [round(float(x), 1) for x in scores])
    assert all(s >= MIN_PSNR for s in scores), scores
    return scores


# --- preset, export, the processor ---------------------------------------------------------------------------


def test_tiny_unclip_is_a_diffusers_unclip_folder(tiny_unclip_model, oracle):
    index = json.loads((tiny_unclip_model / "model_index.json").read_text())
    assert index["_class_name"] == UNCLIP and index["image_encoder"] == ["transformers", "CLIPVisionModelWithProjection"]
    assert oracle.unet.config.class_embed_type == "projection" and oracle.unet.config.projection_class_embeddings_input_dim == 64
    mean, std = oracle.image_normalizer.mean.detach(), oracle.image_normalizer.std.detach()
    assert float(mean.abs().mean()) > 0.1 and float((std - 1).abs().mean()) > 0.1  # not an identity


def test_the_export_contract_has_the_image_encoder_and_the_class_labels(tiny_unclip_onnx, oracle):
    model = open_model_dir(tiny_unclip_onnx)
    assert model.meta.family == "unclip" and "unCLIP" in model.family.describe(model.meta.config)
    assert set(model.meta.components) == {"text_encoder", "unet", "vae_decoder", "image_encoder"}
    assert model.specs["unet"].tensor("class_labels").dims == ("B2", 64)  # embedding (32) + noise-level embedding (32)
    encoder = model.specs["image_encoder"]
    assert encoder.tensor("pixel_values").dims == ("B", 3, 32, 32) and encoder.tensor("image_embeds").dims == ("B", 32)
    stats = model.meta.config["image_normalizer"]
    assert stats["mean"] == oracle.image_normalizer.mean.reshape(-1).tolist()  # float32 values survive JSON exactly
    assert model.meta.config["image_noising_scheduler"]["beta_schedule"] == "squaredcos_cap_v2"
    assert all(row["ok"] for row in model.meta.validation)
    from sdtrt.inspect import describe

    assert "image_encoder" in describe(tiny_unclip_onnx) and "class_labels float32 [B2,64]" in describe(tiny_unclip_onnx)


@pytest.mark.parametrize("settings", [
    {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},  # the toy preset's
    {},  # CLIP's own: 224, bicubic, center crop, OpenAI statistics (stable-diffusion-2-1-unclip's)
    {"size": {"shortest_edge": 64}, "crop_size": {"height": 48, "width": 80}},  # a crop wider than the image: zero padding
], ids=["tiny", "clip-224", "crop-wider-than-image"])
def test_clip_preprocessing_equals_transformers_clip_image_processor(settings):
    from transformers import CLIPImageProcessor

    reference = CLIPImageProcessor(**settings)
    images = [_picture(1), _picture(2, BLUE, 37, 53), _picture(3, RED, 300, 200)]
    config = reference.to_dict()
    expected = reference(images=images, return_tensors="pt").pixel_values
    got = clip_pixels(images, config)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_tiny_unclip_builds_tensorrt_rtx_engines(tiny_unclip_onnx, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="engine builds need the tensorrt-rtx package")
    from sdtrt.engines.build import build_engines

    out = build_engines(tiny_unclip_onnx, tmp_path / "e", target="sm89", components=["unet", "image_encoder"], batch="1:1:2",
                        height="64", width="64", cache=tmp_path / "cache", show_progress=False, log=lambda *_: None)
    engines = open_model_dir(out).manifest.engines
    assert engines["image_encoder"].profile["pixel_values"] == [[1, 3, 32, 32], [1, 3, 32, 32], [2, 3, 32, 32]]
    assert engines["unet"].profile["class_labels"] == [[1, 64], [2, 64], [4, 64]]


# --- the image path, checked directly ---------------------------------------------------------------------------


@pytest.mark.parametrize("noise_level,images,n,cfg", [(0, 1, 1, True), (250, 1, 2, True), (600, 2, 2, True), (40, 2, 1, False)])
def test_the_unets_class_labels_equal_diffusers_encode_image(pipe, oracle, noise_level, images, n, cfg):
    from sdtrt.runtime.pipeline import _Networks

    image = [_picture(1), _picture(2, BLUE)] if images == 2 else _picture(1)
    prompts = ["a", "b"] if images == 2 else ["a", "b", "c"]
    r = pipe.check(Request(prompts, image=image, num_images_per_prompt=n, noise_level=noise_level, guidance_scale=10.0 if cfg else 1.0))
    ours, hooks = pipe.family.image_inputs(r, pipe.config).make(_Networks(pipe), r, seeded(7))
    theirs = oracle._encode_image(image=image, device=torch.device("cpu"), batch_size=len(prompts) * n, num_images_per_prompt=n,
                                  do_classifier_free_guidance=cfg, noise_level=torch.tensor([noise_level]), generator=seeded(7),
                                  image_embeds=None)
    assert not hooks and ours["class_labels"].shape == theirs.shape == ((2 if cfg else 1) * len(prompts) * n, 64)
    assert torch.allclose(ours["class_labels"], theirs, atol=1e-5, rtol=0)


# --- parity with diffusers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler,prompt,kwargs", [
    (None, None, {}),  # no prompt (diffusers' ""), the model's DDIM, guidance 10, noise level 0: diffusers' defaults
    (None, "a red fox", {"noise_level": 300, "guidance_scale": 4.0, "negative_prompt": "blurry"}),
    ("euler_a", "a red fox", {"guidance_scale": 1.0, "noise_level": 100}),
    ("dpmpp_2m_karras", "a fox", {"num_images_per_prompt": 2, "height": 48, "width": 80}),
], ids=["defaults-no-prompt", "noise300-cfg4-negative", "euler-a-no-cfg", "dpmpp2m-karras-two-images-48x80"])
def test_variations_match_diffusers(pipe, tiny_unclip_model, scheduler, prompt, kwargs):
    image = _picture(0)
    ours = pipe(prompt or "", image=image, steps=4, scheduler=scheduler, seed=3, progress=False, **kwargs).images
    oracle = reference_pipeline(tiny_unclip_model, scheduler, cls_name=UNCLIP)
    theirs = oracle(prompt=prompt, image=image, num_inference_steps=4, generator=seeded(3), **kwargs).images
    assert ours[0].size == (kwargs.get("width", 64), kwargs.get("height", 64))
    _same(ours, theirs)


def test_one_image_per_prompt_with_negatives_and_several_images_each_matches_diffusers(pipe, oracle):
    images, prompts, negatives = [_picture(4), _picture(5, BLUE)], ["a cat", "a dog"], ["dark", "blurry"]
    ours = pipe(prompts, negatives, image=images, num_images_per_prompt=2, noise_level=50, steps=3, seed=6, progress=False).images
    theirs = oracle(prompt=prompts, negative_prompt=negatives, image=images, num_images_per_prompt=2, noise_level=50,
                    num_inference_steps=3, generator=seeded(6)).images
    _same(ours, theirs)
    one = pipe(prompts, image=images[0], steps=3, seed=6, progress=False).images  # one PIL image for every prompt
    _same(one, oracle(prompt=prompts, image=images[0], num_inference_steps=3, generator=seeded(6)).images)


# --- the image is real ------------------------------------------------------------------------------------------


def test_the_image_and_the_noise_level_change_the_picture(pipe):
    red = pipe("", image=_picture(0, RED), steps=4, seed=1, progress=False).images[0]
    blue = pipe("", image=_picture(1, BLUE), steps=4, seed=1, progress=False).images[0]
    noisier = pipe("", image=_picture(0, RED), noise_level=500, steps=4, seed=1, progress=False).images[0]
    assert psnr(red, blue) < 30 and psnr(red, noisier) < 30


# --- refusals, CLI, imports -------------------------------------------------------------------------------------


def test_what_unclip_cannot_do_is_refused(pipe):
    with pytest.raises(SdtrtError, match="no image was given: a Stable unCLIP"):
        pipe("a fox", steps=2, progress=False)
    with pytest.raises(SdtrtError, match="strength=0.5 is not used by unCLIP"):
        pipe("a fox", image=_picture(0), strength=0.5, steps=2, progress=False)
    with pytest.raises(SdtrtError, match="noise_level=1000 is above"):
        pipe("a fox", image=_picture(0), noise_level=1000, steps=2, progress=False)
    with pytest.raises(SdtrtError, match="3 images for 2 prompts"):
        pipe(["a", "b"], image=[_picture(0)] * 3, steps=2, progress=False)
    with pytest.raises(SdtrtError, match="depth_map=.* is not used"):
        pipe("a fox", image=_picture(0), depth_map=torch.rand(8, 8), steps=2, progress=False)
    with pytest.raises(SdtrtError, match="LoRA is not supported"):
        pipe.set_loras([("x.safetensors", 1.0)])


def test_cli_generate_makes_variations_with_the_api_image(pipe, tiny_unclip_onnx, tmp_path):
    _picture(0).save(tmp_path / "in.png")
    out = tmp_path / "v.png"
    assert cli(["generate", "", "--model", str(tiny_unclip_onnx), "--image", str(tmp_path / "in.png"), "--noise-level", "100",
                "--steps", "3", "--seed", "2", "--out", str(out), "--no-progress"]) == 0
    api = pipe("", image=tmp_path / "in.png", noise_level=100, steps=3, seed=2, progress=False).images[0]
    assert psnr(Image.open(out), api) == float("inf") and "Noise level: 100" in Image.open(out).text["parameters"]


def test_variations_load_neither_diffusers_nor_transformers(tiny_unclip_onnx, tmp_path):
    _picture(0).save(tmp_path / "in.png")
    code = (f"import sys; from sdtrt import Pipeline; p = Pipeline.load({str(tiny_unclip_onnx)!r});"
            f"p('', image={str(tmp_path / 'in.png')!r}, steps=2, seed=0, progress=False);"
            "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
