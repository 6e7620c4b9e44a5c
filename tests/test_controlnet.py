"""ControlNet: exported as components of their own, the UNet taking their residuals, run by a step hook.
Images equal diffusers' StableDiffusion(XL)ControlNet(Img2Img|Inpaint)Pipeline / MultiControlNet with the
same weights, control images, scales, windows and seeds (PSNR >= 45 dB on uint8, fp32); the ControlNets
are strong enough to move the picture well below that bar, so ignoring them could not pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt import Pipeline
from sdtrt.artifacts import open_model_dir
from sdtrt.cli import main as cli
from sdtrt.errors import SdtrtError
from tests.helpers import psnr, seeded

MIN_PSNR = 45.0
CALL = {"negative_prompt": "blurry", "num_inference_steps": 4}


def control(seed: int, size=(64, 64)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def pipe(tiny_controlnet_onnx):
    return Pipeline.load(tiny_controlnet_onnx)


def oracle(model_dir, controlnets, cls="StableDiffusionControlNetPipeline"):
    import diffusers

    nets = [diffusers.ControlNetModel.from_pretrained(p) for p in controlnets]
    extra = {"safety_checker": None, "requires_safety_checker": False} if "XL" not in cls else {}
    pipe = getattr(diffusers, cls).from_pretrained(model_dir, controlnet=nets[0] if len(nets) == 1 else nets, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(pipe, prompt="a fox", **kw):
    steps = kw.pop("num_inference_steps", CALL["num_inference_steps"])
    return pipe(prompt, negative_prompt=CALL["negative_prompt"], steps=steps, seed=3, progress=False, **kw).images


def theirs(pipe, prompt="a fox", **kw):
    return pipe(prompt, generator=seeded(3), **{**CALL, **kw}).images


def same(a, b):
    scores = [psnr(x, y) for x, y in zip(a, b, strict=True)]
    assert all(s >= MIN_PSNR for s in scores), scores


# --- export ---------------------------------------------------------------------------------------------


def test_each_controlnet_is_a_component_and_the_unet_takes_their_residuals(tiny_controlnet_onnx):
    model = open_model_dir(tiny_controlnet_onnx)
    assert {"controlnet_edges", "controlnet_depth"} <= set(model.specs)
    unet, net = model.specs["unet"], model.specs["controlnet_edges"]
    residuals = [t for t in net.outputs]
    assert [t.name for t in unet.inputs[3:]] == [t.name for t in residuals]  # one input per ControlNet output
    assert [t.dims[2] for t in residuals] == ["h", "h", "h/2", "h/2", "h/2"]  # tiny: conv_in, block 0 + its down-sampler, block 1, mid
    assert model.meta.config["controlnets"]["edges"]["config"]["_class_name"] == "ControlNetModel"
    assert all(row["ok"] for row in model.meta.validation if row["component"].startswith("controlnet"))


def test_a_controlnet_for_another_base_model_is_refused(tiny_sdxl_model, tiny_controlnets, tmp_path, capsys):
    assert cli(["export", str(tiny_sdxl_model), "--out", str(tmp_path / "o"), "--controlnet", str(tiny_controlnets[0]), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "another base model" in err and "--controlnet" in err and not (tmp_path / "o").exists()


# --- txt2img ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {},
    {"controlnet_conditioning_scale": 0.5},
    {"control_guidance_start": 0.2, "control_guidance_end": 0.8},
    {"guess_mode": True},
    {"num_images_per_prompt": 2},
])
def test_one_controlnet_matches_diffusers(pipe, tiny_model, tiny_controlnets, kwargs):
    mine = ours(pipe, controlnet="edges", control_image=control(1), **kwargs)
    same(mine, theirs(oracle(tiny_model, tiny_controlnets[:1]), image=control(1), **kwargs))
    assert psnr(mine[0], ours(pipe)[0]) < 35  # the ControlNet moves the picture well below the parity bar


def test_two_controlnets_with_their_own_scales_and_windows_match_multicontrolnet(pipe, tiny_model, tiny_controlnets):
    kw = {"controlnet_conditioning_scale": [0.7, 1.3], "control_guidance_start": [0.0, 0.25], "control_guidance_end": [0.75, 1.0]}
    mine = ours(pipe, ["a fox", "a cat"], controlnet=["edges", "depth"], control_image=[control(1), control(2)],
                num_images_per_prompt=2, **kw)
    same(mine, theirs(oracle(tiny_model, tiny_controlnets), ["a fox", "a cat"], image=[control(1), control(2)],
                      negative_prompt=["blurry"] * 2, num_images_per_prompt=2, **kw))


def test_non_square_sizes_follow_the_control_image(pipe, tiny_model, tiny_controlnets):
    image = control(4, size=(80, 48))
    mine = ours(pipe, controlnet="edges", control_image=image)
    assert mine[0].size == (80, 48)
    same(mine, theirs(oracle(tiny_model, tiny_controlnets[:1]), image=image))


def test_without_a_controlnet_the_export_makes_the_plain_models_image(pipe, tiny_onnx):
    """The UNet gets zero residuals: exactly the image of an export without ControlNets."""
    plain = Pipeline.load(tiny_onnx)
    assert np.array_equal(np.asarray(ours(pipe)[0]), np.asarray(ours(plain)[0]))


# --- img2img and inpainting ----------------------------------------------------------------------------


def test_controlnet_img2img_matches_diffusers(pipe, tiny_model, tiny_controlnets):
    mine = ours(pipe, image=control(7), controlnet="edges", control_image=control(1), strength=0.7)
    same(mine, theirs(oracle(tiny_model, tiny_controlnets[:1], "StableDiffusionControlNetImg2ImgPipeline"),
                      image=control(7), control_image=control(1), strength=0.7))


def test_controlnet_inpainting_matches_diffusers(pipe, tiny_model, tiny_controlnets):
    mask = Image.fromarray(np.repeat(((np.arange(64) > 30) * 255).astype(np.uint8)[None, :], 64, axis=0))
    mine = ours(pipe, image=control(7), mask_image=mask, controlnet="edges", control_image=control(1))
    same(mine, theirs(oracle(tiny_model, tiny_controlnets[:1], "StableDiffusionControlNetInpaintPipeline"),
                      image=control(7), mask_image=mask, control_image=control(1)))


# --- SDXL -------------------------------------------------------------------------------------------


def test_sdxl_controlnet_matches_diffusers(tiny_sdxl_model, tmp_path):
    from sdtrt.export import export_model
    from sdtrt.models.presets import make_model

    net = make_model("tiny-sdxl-controlnet", tmp_path / "xl-edges")
    out = export_model(tiny_sdxl_model, tmp_path / "onnx", controlnets=[(net, "edges")], show_progress=False, log=lambda *_: None)
    mine = ours(Pipeline.load(out), control_image=control(1), num_images_per_prompt=2)
    same(mine, theirs(oracle(tiny_sdxl_model, [net], "StableDiffusionXLControlNetPipeline"), image=control(1), num_images_per_prompt=2))


# --- refusals and the command line ---------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,words", [
    ({"controlnet": "edges", "control_image": control(1, size=(48, 64)), "height": 64, "width": 64}, "resize"),
    ({"controlnet": ["edges", "depth"], "control_image": [control(1)]}, "1 entries for 2"),
    ({"controlnet": "pose", "control_image": control(1)}, "not in this export"),
    ({"control_image": control(1)}, "controlnet"),
    ({"controlnet": "edges", "control_image": control(1), "control_guidance_start": 0.8, "control_guidance_end": 0.2}, "below"),
    ({"controlnet": "edges"}, "control_image"),
])
def test_bad_controlnet_requests_are_refused(pipe, kwargs, words):
    with pytest.raises(SdtrtError, match=words):
        ours(pipe, **kwargs)


def test_controlnet_on_a_model_without_one_names_the_export_option(tiny_onnx, tmp_path, capsys):
    with pytest.raises(SdtrtError, match="controlnets="):
        Pipeline.load(tiny_onnx)("a fox", control_image=control(1), steps=2, progress=False)
    control(1).save(tmp_path / "c.png")
    assert cli(["generate", "a fox", "--model", str(tiny_onnx), "--control-image", str(tmp_path / "c.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert "--controlnet" in capsys.readouterr().err


def test_generate_runs_controlnets_from_the_command_line(tiny_controlnet_onnx, tiny_model, tiny_controlnets, tmp_path):
    control(1).save(tmp_path / "c1.png")
    control(2).save(tmp_path / "c2.png")
    assert cli(["generate", "a fox", "--model", str(tiny_controlnet_onnx), "--controlnet", "edges", "--control-image", str(tmp_path / "c1.png"),
                "--controlnet", "depth", "--control-image", str(tmp_path / "c2.png"), "--control-scale", "0.7", "--control-scale", "1.3",
                "--control-start", "0", "--control-start", "0.25", "--negative-prompt", "blurry", "--steps", "4", "--seed", "3",
                "--out", str(tmp_path / "x.png"), "--no-progress"]) == 0
    reference = theirs(oracle(tiny_model, tiny_controlnets), image=[control(1), control(2)], controlnet_conditioning_scale=[0.7, 1.3],
                       control_guidance_start=[0.0, 0.25], control_guidance_end=[1.0, 1.0])
    same([Image.open(tmp_path / "x.png").convert("RGB")], reference)


def test_canny_preprocessing_uses_opencv(tiny_controlnet_onnx, tmp_path):
    import cv2

    from sdtrt.runtime.controlnet import canny

    picture = control(5)
    edges = canny(picture, 50, 150)
    expected = cv2.Canny(np.asarray(picture), 50, 150)
    assert np.array_equal(np.asarray(edges)[..., 0], expected) and np.asarray(edges).shape == (64, 64, 3)
    picture.save(tmp_path / "p.png")
    assert cli(["generate", "a fox", "--model", str(tiny_controlnet_onnx), "--controlnet", "edges", "--control-image", str(tmp_path / "p.png"),
                "--control-preprocess", "canny", "--canny-thresholds", "50", "150", "--steps", "2", "--out", str(tmp_path / "y.png"),
                "--no-progress"]) == 0


def test_controlnets_and_the_residual_unet_build_tensorrt_rtx_engines(tiny_controlnet_onnx, tmp_path, capsys):
    pytest.importorskip("tensorrt_rtx", reason="engine builds need the tensorrt-rtx package")
    from sdtrt.engines.build import build_engines

    out = build_engines(tiny_controlnet_onnx, tmp_path / "e", target="sm89", batch="1:1:2", height="48:64:96", width="48:64:96",
                        components=["unet", "controlnet_edges"], cache=tmp_path / "c", show_progress=False, log=lambda *_: None)
    engines = open_model_dir(out).manifest.engines
    assert engines["controlnet_edges"].profile["controlnet_cond"] == [[1, 3, 48, 48], [2, 3, 64, 64], [4, 3, 96, 96]]
    assert engines["unet"].profile["mid_block_res"] == [[1, 64, 3, 3], [2, 64, 4, 4], [4, 64, 6, 6]]  # ceil(h / 2)
    assert cli(["inspect", str(out)]) == 0
    assert "ControlNets: edges" in capsys.readouterr().out
