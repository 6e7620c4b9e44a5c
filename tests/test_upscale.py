"""The Stable Diffusion x4 upscaler through the model-family layer: preset, export contract (7-channel UNet with
noise-level class labels, 4-pixels-per-latent VAE), TensorRT-RTX engines, and images equal to diffusers'
StableDiffusionUpscalePipeline on the same tiny-upscaler folder.

Tolerance: PSNR >= 45 dB on the uint8 images (fp32 ONNX Runtime against fp32 torch; same weights, scheduler and
seed). Measured 84-88 dB or identical. To show the bar means something, the tests also check that what conditions the picture
moves it far below the bar: another low-res image, another noise level, tiling against no tiling.
"""

from __future__ import annotations

import json
import shutil
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
from sdtrt.models.presets import build_components, get_preset
from sdtrt.runtime.request import InvalidRequest
from tests.helpers import psnr, reference_pipeline, seeded

MIN_PSNR = 45.0
UPSCALE = "StableDiffusionUpscalePipeline"


@pytest.fixture(scope="module")
def pipe(tiny_upscaler_onnx):
    return Pipeline.load(tiny_upscaler_onnx)


def _oracle(model, scheduler=None):
    return reference_pipeline(model, scheduler, cls_name=UPSCALE)


def _low_res(seed: int, width: int = 24, height: int = 16) -> Image.Image:
    """A smooth random picture (a noise image would make every upscale look alike)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 4), max(2, width // 4), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def _same(ours, theirs) -> list[float]:
    scores = [psnr(a, b) for a, b in zip(ours, theirs, strict=True)]
    print("PSNR dB:", [round(x, 1) for x in scores])
    assert all(s >= MIN_PSNR for s in scores), scores
    return scores


# --- preset and export -----------------------------------------------------------------------------------


def test_sd_x4_upscaler_preset_has_the_published_architecture():
    preset = get_preset("sd-x4-upscaler")
    parts = build_components(preset, seed=0, device="meta")
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items() if hasattr(m, "parameters")}
    assert counts == {"unet": 473_398_020, "vae": 55_325_927, "text_encoder": 340_387_840}
    unet = parts["unet"].config
    assert unet.in_channels == 7 and unet.num_class_embeds == 1000 and list(unet.only_cross_attention) == [True, True, True, False]
    assert parts["vae"].config.scaling_factor == 0.08333 and len(parts["vae"].config.block_out_channels) == 3
    assert parts["scheduler"].config.prediction_type == "v_prediction"
    assert type(parts["low_res_scheduler"]).__name__ == "DDPMScheduler" and preset.pipeline["max_noise_level"] == 350
    assert preset.default_size == 512  # 128 latents x 4 pixels


def test_tiny_upscaler_is_a_diffusers_upscale_folder(tiny_upscaler_model):
    index = json.loads((tiny_upscaler_model / "model_index.json").read_text())
    assert index["_class_name"] == UPSCALE and index["low_res_scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["max_noise_level"] == 350
    pipe = _oracle(tiny_upscaler_model)
    assert pipe.vae_scale_factor == 4 and pipe.unet.config.in_channels == 7


def test_the_export_contract_comes_from_the_configs(tiny_upscaler_onnx):
    model = open_model_dir(tiny_upscaler_onnx)
    assert model.meta.family == "upscale" and "x4 upscaler" in model.family.describe(model.meta.config)
    assert set(model.meta.components) == {"text_encoder", "unet", "vae_decoder"}  # the upscaler never encodes
    unet = model.specs["unet"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states", "class_labels"]
    assert unet.tensor("sample").dims == ("B2", 7, "h", "w") and unet.tensor("class_labels").dims == ("B2",)
    assert unet.tensor("class_labels").dtype == "int32"
    # 4 output pixels per latent: the decoder's output and every profile follow the VAE's own factor
    assert model.specs["vae_decoder"].output_shapes({"latent": (1, 4, 16, 24)}) == {"images": (1, 3, 64, 96)}
    assert model.meta.config["low_res_scheduler"]["beta_schedule"] == "scaled_linear"
    assert model.meta.default_size == [64, 64] and all(row["ok"] for row in model.meta.validation)
    from sdtrt.inspect import describe

    shown = describe(tiny_upscaler_onnx)
    assert "Stable Diffusion x4 upscaler" in shown and "class_labels int32 [B2]" in shown and "sample float32 [B2,7,h,w]" in shown


def test_a_vae_scaling_factor_other_than_0_08333_is_overridden_as_diffusers_does(tiny_upscaler_model, tmp_path):
    from sdtrt.export.source import inspect_source

    folder = tmp_path / "m"
    shutil.copytree(tiny_upscaler_model, folder)
    config = json.loads((folder / "vae" / "config.json").read_text())
    (folder / "vae" / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.18215}))
    assert inspect_source(folder).config["vae"]["scaling_factor"] == 0.08333
    assert _oracle(folder).vae.config.scaling_factor == 0.08333


def test_tiny_upscaler_builds_tensorrt_rtx_engines_with_x4_profiles(tiny_upscaler_onnx, tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="engine builds need the tensorrt-rtx package")
    from sdtrt.engines.build import build_engines

    out = build_engines(tiny_upscaler_onnx, tmp_path / "e", target="sm89", batch="1:1:2", height="64:64:128", width="64:96:128",
                        cache=tmp_path / "cache", show_progress=False, log=lambda *_: None)
    engines = open_model_dir(out).manifest.engines
    assert set(engines) == {"text_encoder", "unet", "vae_decoder"}
    # --height/--width are output pixels: 64-128 px is 16-32 latents (and low-res pixels) at 4 pixels per latent
    assert engines["unet"].profile["sample"] == [[1, 7, 16, 16], [2, 7, 16, 24], [4, 7, 32, 32]]
    assert engines["unet"].profile["class_labels"] == [[1], [2], [4]]
    assert engines["vae_decoder"].profile["latent"] == [[1, 4, 16, 16], [1, 4, 16, 24], [2, 4, 32, 32]]


# --- parity with diffusers --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler,kwargs", [
    (None, {}),  # the model's DDIM (v-prediction), guidance 9.0, noise level 20: diffusers' defaults
    (None, {"noise_level": 150, "guidance_scale": 4.0, "negative_prompt": "blurry"}),
    ("dpmpp_2m_karras", {"noise_level": 0}),
    ("euler_a", {"guidance_scale": 1.0}),  # guidance off; ancestral steps draw from the generator too
    ("unipc", {"noise_level": 350, "num_images_per_prompt": 2}),
], ids=["defaults", "noise150-cfg4-negative", "dpmpp2m-karras-noise0", "euler-a-no-cfg", "unipc-noise350-two-per-image"])
def test_upscale_matches_diffusers(pipe, tiny_upscaler_model, scheduler, kwargs):
    image = _low_res(0)
    ours = pipe("a red fox", image=image, steps=3, scheduler=scheduler, seed=5, progress=False, **kwargs)
    diffusers_kwargs = {k: v for k, v in kwargs.items()}
    theirs = _oracle(tiny_upscaler_model, scheduler)("a red fox", image=image, num_inference_steps=3, generator=seeded(5),
                                                     **diffusers_kwargs).images
    assert ours.images[0].size == (96, 64)  # 4x 24x16
    _same(ours.images, theirs)


def test_a_batch_of_images_with_prompts_negatives_and_several_images_each_matches_diffusers(pipe, tiny_upscaler_model):
    """diffusers tiles the low-res images (image 0, image 1, image 0, image 1) while prompts go per image (p0, p0,
    p1, p1): with two prompts and two images per prompt, prompt 0's second picture is made from image 1. Kept."""
    images = [_low_res(1, 16, 24), _low_res(2, 16, 24)]
    prompts, negatives = ["a cat", "a dog"], ["blurry", "dark"]
    ours = pipe(prompts, negatives, image=images, num_images_per_prompt=2, steps=3, seed=8, progress=False).images
    theirs = _oracle(tiny_upscaler_model)(prompts, image=images, negative_prompt=negatives, num_images_per_prompt=2,
                                          num_inference_steps=3, generator=seeded(8)).images
    _same(ours, theirs)
    assert [im.size for im in ours] == [(64, 96)] * 4


def test_one_image_for_several_prompts_equals_the_list_written_out(pipe, tiny_upscaler_model):
    image = _low_res(3)
    ours = pipe(["a cat", "a dog"], image=image, steps=2, seed=2, progress=False).images
    theirs = _oracle(tiny_upscaler_model)(["a cat", "a dog"], image=[image, image], num_inference_steps=2, generator=seeded(2)).images
    _same(ours, theirs)


def test_generators_per_image_tensors_and_resize_match_diffusers(pipe, tiny_upscaler_model):
    oracle = _oracle(tiny_upscaler_model)
    images = [_low_res(4), _low_res(5)]
    ours = pipe(["a", "b"], image=images, steps=2, progress=False, generator=[seeded(i) for i in range(2)]).images
    theirs = oracle(["a", "b"], image=images, num_inference_steps=2, generator=[seeded(i) for i in range(2)]).images
    _same(ours, theirs)
    tensor = torch.rand(1, 3, 20, 28, generator=seeded(0))  # [0, 1], as diffusers takes tensors
    ours = pipe("a", image=tensor, steps=2, seed=3, progress=False).images
    _same(ours, oracle("a", image=tensor, num_inference_steps=2, generator=seeded(3)).images)
    odd = _low_res(6, 26, 18)  # not a multiple of 4: floored to 24x16 with a bicubic resize, as diffusers does
    with pytest.raises(SdtrtError, match="not a multiple of 4"):
        pipe("a", image=odd, steps=2, seed=3, progress=False)
    ours = pipe("a", image=odd, resize=True, steps=2, seed=3, progress=False).images
    _same(ours, oracle("a", image=odd, num_inference_steps=2, generator=seeded(3)).images)
    assert ours[0].size == (96, 64)


def test_vae_tiling_matches_diffusers_enable_tiling_for_a_large_output(pipe, tiny_upscaler_model):
    """The tiny VAE's tiles are 32 px (8 latents): a 40x28 input decodes 160x112 px in 4 x 6 blended tiles."""
    image = _low_res(7, 40, 28)
    oracle = _oracle(tiny_upscaler_model)
    oracle.vae.enable_tiling()
    theirs = oracle("a castle", image=image, num_inference_steps=2, generator=seeded(9)).images
    tiled = pipe("a castle", image=image, steps=2, seed=9, vae_tiling=True, progress=False).images
    whole = pipe("a castle", image=image, steps=2, seed=9, progress=False).images
    _same(tiled, theirs)
    assert tiled[0].size == (160, 112) and psnr(whole[0], tiled[0]) < 40  # the tiles really are blended, not one decode


# --- the conditioning is real -------------------------------------------------------------------------------


def test_the_low_res_image_and_the_noise_level_change_the_picture(pipe):
    base = pipe("a fox", image=_low_res(0), steps=3, seed=1, progress=False).images[0]
    other_image = pipe("a fox", image=_low_res(10), steps=3, seed=1, progress=False).images[0]
    other_level = pipe("a fox", image=_low_res(0), noise_level=250, steps=3, seed=1, progress=False).images[0]
    assert psnr(base, other_image) < 30 and psnr(base, other_level) < 35


# --- refusals ---------------------------------------------------------------------------------------------


def test_an_upscale_without_an_image_says_so(pipe):
    with pytest.raises(SdtrtError, match="no image was given: a Stable Diffusion x4 upscaler model needs the low-res image") as e:
        pipe("a fox", steps=2, progress=False)
    assert e.value.cli_fix == "pass --image low_res.png"


@pytest.mark.parametrize("params,match", [
    ({"image": "IMG", "height": 128}, "height=128 is set by the image"),
    ({"image": "IMG", "strength": 0.5}, "strength=0.5 is not used"),
    ({"image": "IMG", "noise_level": 351}, "above this model's max_noise_level 350"),
    ({"image": "IMG", "mask_image": "IMG"}, "inpainting"),
    ({"image": "IMG", "controlnet": "canny", "control_image": "IMG"}, "no ControlNet pipeline"),
    ({"image": "IMG", "depth_map": torch.zeros(8, 8)}, "depth_map=.* is not used"),
    ({"image": ["IMG", "IMG", "IMG"]}, "3 images for 1 prompts"),
])
def test_what_the_upscaler_cannot_do_is_refused_naming_the_parameter(pipe, params, match):
    params = {k: (_low_res(0) if v == "IMG" else [_low_res(0)] * 3 if isinstance(v, list) else v) for k, v in params.items()}
    with pytest.raises(InvalidRequest, match=match):
        pipe("a fox", steps=2, progress=False, **params)


def test_adapters_are_refused_and_noise_level_is_refused_on_other_families(pipe, tiny_onnx, tmp_path):
    with pytest.raises(SdtrtError, match="LoRA is not supported .* x4 upscaler") as e:
        pipe.set_loras([(tmp_path / "x.safetensors", 1.0)])
    assert "fuse_lora" in e.value.fix
    pipe.set_loras([])  # clearing is always fine
    with pytest.raises(InvalidRequest, match="noise_level=20 is not used by Stable Diffusion"):
        Pipeline.load(tiny_onnx)("a fox", steps=1, noise_level=20, progress=False)


def test_an_upscaler_folder_with_a_controlnet_is_refused_at_export(tiny_upscaler_model, tiny_controlnets, tmp_path):
    from sdtrt.export import export_model

    with pytest.raises(SdtrtError):
        export_model(tiny_upscaler_model, tmp_path / "o", controlnets=[(tiny_controlnets[0], "edges")], show_progress=False)
    assert not (tmp_path / "o").exists()


# --- CLI and the runtime's imports ------------------------------------------------------------------------------


def test_cli_upscale_writes_the_api_image_with_parameters_and_never_clobbers(pipe, tiny_upscaler_onnx, tmp_path, capsys):
    low = tmp_path / "low.png"
    _low_res(0).save(low)
    out = tmp_path / "big.png"
    argv = ["upscale", str(low), "--model", str(tiny_upscaler_onnx), "--prompt", "a red fox", "--noise-level", "60", "--steps", "3",
            "--seed", "4", "--out", str(out), "--no-progress"]
    assert cli(argv) == 0
    api = pipe("a red fox", image=Image.open(low), noise_level=60, steps=3, seed=4, progress=False).images[0]
    written = Image.open(out)
    assert written.size == (96, 64) and psnr(written, api) == float("inf")
    assert "Noise level: 60" in written.text["parameters"] and "CFG scale: 9.0" in written.text["parameters"]
    capsys.readouterr()
    assert cli(argv) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_upscale_errors_are_one_line_naming_the_flag(tiny_upscaler_onnx, tiny_onnx, tmp_path, capsys):
    odd = tmp_path / "odd.png"
    _low_res(0, 26, 18).save(odd)
    cases = [
        (["upscale", str(odd), "--model", str(tiny_upscaler_onnx), "--out", str(tmp_path / "a.png")], "--resize"),
        (["upscale", str(odd), "--model", str(tiny_onnx), "--out", str(tmp_path / "b.png")], "not an x4 upscaler"),
        (["upscale", str(odd), "--model", str(tiny_upscaler_onnx), "--resize", "--noise-level", "999", "--out", str(tmp_path / "c.png")],
         "--noise-level 999"),
        (["upscale", str(odd), str(odd), "--model", str(tiny_upscaler_onnx), "--prompt", "a", "--prompt", "b", "--prompt", "c"],
         "3 --prompt values for 2 images"),
    ]
    for argv, needle in cases:
        assert cli(argv + ["--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("sdtrt: error:") and "Fix:" in err[0] and needle in err[0], err
    assert not any(p.name in ("a.png", "b.png", "c.png") for p in tmp_path.iterdir())


def test_upscaling_loads_neither_diffusers_nor_transformers(tiny_upscaler_onnx, tmp_path):
    low = tmp_path / "low.png"
    _low_res(0).save(low)
    code = (f"import sys; from sdtrt import Pipeline; p = Pipeline.load({str(tiny_upscaler_onnx)!r});"
            f"p('a', image={str(low)!r}, steps=2, seed=0, progress=False);"
            "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
