"""Stable Diffusion depth2img through the model-family layer: preset (with a toy DPT depth estimator), export
contract (5-channel UNet, `depth_estimator` component), DPTImageProcessor reproduced in torch, TensorRT-RTX
engines, and images equal to diffusers' StableDiffusionDepth2ImgPipeline on the same tiny-depth2img folder, with a
user's depth map and with the depth estimated from the image.

Tolerances: PSNR >= 45 dB on the uint8 images (fp32 ONNX Runtime against fp32 torch; same weights, scheduler and
seed; measured 83-88 dB or identical); the depth estimator's input equals transformers' processor to 1e-6 (float32 of
the same uint8 pixels). The depth map must matter: another depth map moves the picture far below the bar.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt import Pipeline
from sdtrt.artifacts import open_model_dir
from sdtrt.cli import main as cli
from sdtrt.errors import SdtrtError
from sdtrt.runtime.image_processors import dpt_pixels
from tests.helpers import psnr, reference_pipeline, seeded

MIN_PSNR = 45.0
DEPTH2IMG = "StableDiffusionDepth2ImgPipeline"


@pytest.fixture(scope="module")
def pipe(tiny_depth2img_onnx):
    return Pipeline.load(tiny_depth2img_onnx)


@pytest.fixture(scope="module")
def oracle(tiny_depth2img_model):
    return reference_pipeline(tiny_depth2img_model, cls_name=DEPTH2IMG)


def _picture(seed: int, width: int = 64, height: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)


def _gradient(height: int, width: int, flip: bool = False) -> torch.Tensor:
    """A depth map: near at the bottom (larger = nearer), or at the top when flipped."""
    ramp = torch.linspace(0, 1, height)[:, None].expand(height, width).clone()
    return (ramp.flip(0) if flip else ramp)[None]


def _same(ours, theirs) -> list[float]:
    scores = [psnr(a, b) for a, b in zip(ours, theirs, strict=True)]
    print("PSNR dB:", [round(float(x), 1) for x in scores])
    assert all(s >= MIN_PSNR for s in scores), scores
    return scores


# --- preset, export, the processor ---------------------------------------------------------------------------


def test_tiny_depth2img_is_a_diffusers_depth2img_folder(tiny_depth2img_model, oracle):
    index = json.loads((tiny_depth2img_model / "model_index.json").read_text())
    assert index["_class_name"] == DEPTH2IMG
    assert index["depth_estimator"] == ["transformers", "DPTForDepthEstimation"]
    assert index["feature_extractor"] == ["transformers", "DPTImageProcessor"]
    assert oracle.unet.config.in_channels == 5 and not oracle.depth_estimator.config.is_hybrid
    depth = oracle.depth_estimator(torch.rand(1, 3, 32, 32)).predicted_depth
    assert depth.shape == (1, 64, 64) and float(depth.std()) > 1e-4  # a toy depth map that varies, not ~0 everywhere


def test_the_export_contract_has_the_depth_estimator(tiny_depth2img_onnx):
    model = open_model_dir(tiny_depth2img_onnx)
    assert model.meta.family == "depth" and "depth2img" in model.family.describe(model.meta.config)
    assert set(model.meta.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder", "depth_estimator"}
    assert model.specs["unet"].tensor("sample").dims == ("B2", 5, "h", "w")
    dpt = model.specs["depth_estimator"]
    assert dpt.tensor("pixel_values").dims == ("B", 3, 32, 32) and dpt.tensor("predicted_depth").dims == ("B", 64, 64)
    assert all(row["ok"] for row in model.meta.validation)
    from sdtrt.inspect import describe

    assert "depth_estimator" in describe(tiny_depth2img_onnx) and "pixel_values float32 [B,3,32,32]" in describe(tiny_depth2img_onnx)


@pytest.mark.parametrize("settings", [
    {},  # the toy preset's: 32 x 32, bilinear (stable-diffusion-2-depth's filter)
    {"size": {"height": 384, "width": 384}},  # stable-diffusion-2-depth's own
    {"size": {"height": 64, "width": 96}, "resample": 3, "ensure_multiple_of": 14, "image_mean": [0.485, 0.456, 0.406],
     "image_std": [0.229, 0.224, 0.225]},
], ids=["tiny", "sd2-depth-384", "bicubic-multiple-14"])
def test_dpt_preprocessing_equals_transformers_dpt_image_processor(tiny_depth2img_model, settings):
    from transformers import DPTImageProcessor

    config = {**json.loads((tiny_depth2img_model / "feature_extractor" / "preprocessor_config.json").read_text()), **settings}
    reference = DPTImageProcessor(**{k: v for k, v in config.items() if k != "image_processor_type"})
    images = [_picture(1), _picture(2, 37, 53), _picture(3, 400, 300)]
    expected = reference(images=images, return_tensors="pt").pixel_values
    got = dpt_pixels(images, config)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6, rtol=0)


def test_tiny_depth2img_builds_tensorrt_rtx_engines_with_the_depth_estimator(tiny_depth2img_onnx, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="engine builds need the tensorrt-rtx package")
    from sdtrt.engines.build import build_engines

    out = build_engines(tiny_depth2img_onnx, tmp_path / "e", target="sm89", components=["unet", "depth_estimator"], batch="1:1:2",
                        height="48:64:64", width="64", cache=tmp_path / "cache", show_progress=False, log=lambda *_: None)
    engines = open_model_dir(out).manifest.engines
    assert engines["depth_estimator"].profile["pixel_values"] == [[1, 3, 32, 32], [1, 3, 32, 32], [2, 3, 32, 32]]
    assert engines["unet"].profile["sample"] == [[1, 5, 6, 8], [2, 5, 8, 8], [4, 5, 8, 8]]


# --- parity with diffusers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler,kwargs", [
    (None, {}),  # the model's PNDM, strength 0.8, guidance 7.5: diffusers' defaults
    (None, {"strength": 0.6, "guidance_scale": 4.0, "negative_prompt": "blurry"}),
    ("euler_a", {"guidance_scale": 1.0, "strength": 1.0}),
    ("dpmpp_2m_karras", {"num_images_per_prompt": 2}),
], ids=["defaults", "strength06-cfg4-negative", "euler-a-no-cfg-strength1", "dpmpp2m-karras-two-images"])
@pytest.mark.parametrize("depth", ["auto", "given"])
def test_depth2img_matches_diffusers(pipe, oracle, tiny_depth2img_model, scheduler, kwargs, depth):
    image = _picture(0)
    extra = {"depth_map": _gradient(40, 50)} if depth == "given" else {}  # any size: resized to the latents, as diffusers does
    ours = pipe("a house by a lake", image=image, steps=4, scheduler=scheduler, seed=3, progress=False, **extra, **kwargs).images
    theirs = reference_pipeline(tiny_depth2img_model, scheduler, cls_name=DEPTH2IMG)(
        "a house by a lake", image=image, num_inference_steps=4, generator=seeded(3), **extra, **kwargs).images
    assert ours[0].size == (64, 48)
    _same(ours, theirs)


def test_two_prompts_two_images_each_and_a_depth_map_per_image_match_diffusers(pipe, oracle):
    image = _picture(4, 48, 64)
    prompts, negatives = ["a cat", "a dog"], ["dark", "blurry"]
    kwargs = dict(image=image, num_images_per_prompt=2)
    _same(pipe(prompts, negatives, steps=3, seed=6, progress=False, **kwargs).images,
          oracle(prompts, negative_prompt=negatives, num_inference_steps=3, generator=seeded(6), **kwargs).images)
    maps = torch.cat([_gradient(64, 48), _gradient(64, 48, flip=True)])  # tiled over the 4 images, as diffusers tiles them
    _same(pipe(prompts, steps=3, seed=6, progress=False, depth_map=maps, **kwargs).images,
          oracle(prompts, num_inference_steps=3, generator=seeded(6), depth_map=maps, **kwargs).images)


def test_a_depth_map_file_gives_diffusers_image_for_the_same_values(pipe, oracle, tmp_path):
    """A 16-bit PNG is read as one float channel (its 0-65535 values); min-max scaling makes the unit irrelevant."""
    values = (np.linspace(0, 1, 48 * 64).reshape(48, 64) ** 2 * 65535).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "depth.png")
    image = _picture(5)
    ours = pipe("a road", image=image, depth_map=tmp_path / "depth.png", steps=3, seed=2, progress=False).images
    theirs = oracle("a road", image=image, depth_map=torch.from_numpy(values.astype(np.float32))[None], num_inference_steps=3,
                    generator=seeded(2)).images
    _same(ours, theirs)


# --- the depth is real --------------------------------------------------------------------------------------------


def test_the_depth_map_changes_the_picture(pipe):
    image = _picture(0)
    near_bottom = pipe("a room", image=image, depth_map=_gradient(48, 64), steps=4, seed=1, progress=False).images[0]
    near_top = pipe("a room", image=image, depth_map=_gradient(48, 64, flip=True), steps=4, seed=1, progress=False).images[0]
    estimated = pipe("a room", image=image, steps=4, seed=1, progress=False).images[0]
    assert psnr(near_bottom, near_top) < 35 and psnr(near_bottom, estimated) < 35
    # at strength 1 the start latents are (almost) pure noise: two pictures under one given depth map differ little
    # (measured 51 dB), under their own estimated depth much more (38 dB): the estimate is what carries the image
    other, start = _picture(9), image
    given = [pipe("a room", image=i, depth_map=_gradient(48, 64), steps=4, seed=1, progress=False, strength=1.0).images[0]
             for i in (other, start)]
    auto = [pipe("a room", image=i, steps=4, seed=1, progress=False, strength=1.0).images[0] for i in (other, start)]
    assert psnr(*auto) < 42 and psnr(*given) > psnr(*auto) + 8


# --- refusals ---------------------------------------------------------------------------------------------------


def test_what_depth2img_cannot_do_is_refused(pipe):
    with pytest.raises(SdtrtError, match="no image was given"):
        pipe("a fox", steps=2, progress=False)
    with pytest.raises(SdtrtError, match="depth map was given without the image"):
        pipe("a fox", depth_map=_gradient(8, 8), steps=2, progress=False)
    with pytest.raises(SdtrtError, match="constant or not finite"):
        pipe("a fox", image=_picture(0), depth_map=torch.ones(1, 8, 8), steps=2, progress=False)
    with pytest.raises(SdtrtError, match="inpainting"):
        pipe("a fox", image=_picture(0), mask_image=_picture(1), steps=2, progress=False)
    with pytest.raises(SdtrtError, match="noise_level=3 is not used"):
        pipe("a fox", image=_picture(0), noise_level=3, steps=2, progress=False)
    with pytest.raises(SdtrtError, match="Textual Inversion is not supported"):
        pipe.load_textual_inversion("x.safetensors")


def test_an_export_without_the_depth_estimator_takes_depth_maps_and_says_what_auto_needs(tiny_depth2img_model, tmp_path):
    from sdtrt.export import export_model

    out = export_model(tiny_depth2img_model, tmp_path / "o", components=["text_encoder", "unet", "vae_decoder", "vae_encoder"],
                       show_progress=False, log=lambda *_: None)
    pipe = Pipeline.load(out)
    assert pipe("a fox", image=_picture(0), depth_map=_gradient(48, 64), steps=2, seed=0, progress=False).images
    with pytest.raises(SdtrtError, match="lacks depth_estimator"):
        pipe("a fox", image=_picture(0), steps=2, seed=0, progress=False)


# --- CLI and imports -------------------------------------------------------------------------------------------


def test_cli_depth_flags_give_the_api_images(pipe, tiny_depth2img_onnx, tmp_path, capsys):
    _picture(0).save(tmp_path / "in.png")
    Image.fromarray((np.linspace(0, 255, 48 * 64).reshape(48, 64)).astype(np.uint8)).save(tmp_path / "d.png")
    base = ["generate", "a house", "--model", str(tiny_depth2img_onnx), "--image", str(tmp_path / "in.png"), "--steps", "3", "--seed", "2",
            "--no-progress"]
    assert cli(base + ["--depth", "auto", "--out", str(tmp_path / "auto.png")]) == 0
    assert cli(base + ["--depth-map", str(tmp_path / "d.png"), "--out", str(tmp_path / "given.png")]) == 0
    auto = pipe("a house", image=tmp_path / "in.png", steps=3, seed=2, progress=False).images[0]
    given = pipe("a house", image=tmp_path / "in.png", depth_map=tmp_path / "d.png", steps=3, seed=2, progress=False).images[0]
    assert psnr(Image.open(tmp_path / "auto.png"), auto) == float("inf") and psnr(Image.open(tmp_path / "given.png"), given) == float("inf")
    capsys.readouterr()
    assert cli(base + ["--depth", "auto", "--depth-map", str(tmp_path / "d.png"), "--out", str(tmp_path / "both.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--depth auto and --depth-map" in err[0] and not (tmp_path / "both.png").exists()


def test_auto_depth_loads_neither_diffusers_nor_transformers(tiny_depth2img_onnx, tmp_path):
    _picture(0).save(tmp_path / "in.png")
    code = (f"import sys; from sdtrt import Pipeline; p = Pipeline.load({str(tiny_depth2img_onnx)!r});"
            f"p('a', image={str(tmp_path / 'in.png')!r}, steps=2, seed=0, progress=False);"
            "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
