"""SDXL through the model-family layer: presets, export contract, engines, and images equal to
diffusers' StableDiffusionXLPipeline / Img2Img / Inpaint pipelines (PSNR >= 45 dB on uint8, fp32,
same weights, scheduler and seed; measured 85 dB to identical)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt import Pipeline
from sdtrt.artifacts import open_model_dir
from sdtrt.errors import SdtrtError
from sdtrt.models.presets import build_components, get_preset
from tests.helpers import psnr, reference_pipeline, seeded

MIN_PSNR = 45.0


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_onnx):
    return Pipeline.load(tiny_sdxl_onnx)


@pytest.fixture(scope="module")
def oracle(tiny_sdxl_model):
    return reference_pipeline(tiny_sdxl_model, cls_name="StableDiffusionXLPipeline")


def _same(ours, theirs) -> list[float]:
    scores = [psnr(a, b) for a, b in zip(ours, theirs, strict=True)]
    assert all(s >= MIN_PSNR for s in scores), scores
    return scores


# --- presets and export ------------------------------------------------------------------------------


def test_sdxl_preset_has_the_published_parameter_counts():
    parts = build_components(get_preset("sdxl"), seed=0, device="meta")
    counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items() if hasattr(m, "parameters")}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}


def test_tiny_sdxl_has_both_encoders_with_the_real_vocabulary(tiny_sdxl_model):
    from transformers import CLIPTokenizer

    one, two = CLIPTokenizer.from_pretrained(tiny_sdxl_model / "tokenizer"), CLIPTokenizer.from_pretrained(tiny_sdxl_model / "tokenizer_2")
    assert one("a photo of a cat").input_ids == two("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (one.pad_token, two.pad_token) == ("<|endoftext|>", "!")  # OpenAI CLIP and OpenCLIP pad differently
    index = json.loads((tiny_sdxl_model / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"] and index["force_zeros_for_empty_prompt"]


def test_the_family_comes_from_model_index_and_the_contract_from_the_config(tiny_sdxl_onnx):
    model = open_model_dir(tiny_sdxl_onnx)
    assert model.meta.family == "sdxl" and model.family.describe(model.meta.config) == "SDXL base"
    specs = model.specs
    assert [t.name for t in specs["text_encoder_2"].outputs] == ["text_embeddings", "skipped_embeddings", "pooled_embeddings"]
    assert specs["text_encoder_2"].tensor("pooled_embeddings").dims == ("T", 32)
    assert [t.name for t in specs["unet"].inputs] == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    assert specs["unet"].tensor("encoder_hidden_states").dims == ("B2", "S", 64)  # 32 + 32: both encoders side by side
    assert specs["unet"].tensor("time_ids").dims == ("B2", 6)
    assert set(model.meta.tokenizers) == {"text_encoder", "text_encoder_2"}


def test_fp16_export_keeps_the_sdxl_vae_in_fp32(tiny_sdxl_model, tmp_path):
    from sdtrt.export import export_model

    out = export_model(tiny_sdxl_model, tmp_path / "fp16", dtype="fp16", show_progress=False, log=lambda *_: None)
    meta = open_model_dir(out).meta
    assert {n: f.dtype for n, f in meta.components.items()} == {
        "text_encoder": "fp16", "text_encoder_2": "fp16", "unet": "fp16", "vae_decoder": "fp32"}
    assert all(row["ok"] for row in meta.validation)
    images = Pipeline.load(out)("a fox", steps=3, seed=1, progress=False).images
    assert np.asarray(images[0]).std() > 1  # a picture, not a NaN-black square


def test_refiner_has_the_second_encoder_and_aesthetic_time_ids(tiny_sdxl_refiner_onnx):
    model = open_model_dir(tiny_sdxl_refiner_onnx)
    assert model.family.describe(model.meta.config) == "SDXL refiner"
    assert set(model.meta.tokenizers) == {"text_encoder_2"}
    assert model.specs["unet"].tensor("time_ids").dims == ("B2", 5)  # original size, crop, aesthetic score


# --- txt2img parity ----------------------------------------------------------------------------------

PROMPTS = ["a watercolor fox", "a red bicycle"]


@pytest.mark.parametrize("prompt,kwargs", [
    ("a fox", {}),  # no negative prompt: force_zeros_for_empty_prompt -> zeros, not the embeddings of ""
    ("a fox", {"negative_prompt": ""}),  # an empty string is a prompt: encoded
    ("a fox", {"negative_prompt": "blurry", "guidance_scale": 1.0}),  # guidance off: the UNet runs on B
    (PROMPTS, {"prompt_2": ["a dog", "a cow"], "negative_prompt": ["ugly", "dark"], "negative_prompt_2": ["grey", "flat"],
               "num_images_per_prompt": 2}),
    (PROMPTS, {"original_size": (128, 96), "target_size": (64, 64), "crops_coords_top_left": (4, 8),
               "negative_original_size": (32, 32), "negative_target_size": (48, 48), "negative_crops_coords_top_left": (2, 2),
               "num_images_per_prompt": 2}),  # diffusers' batch order of negative time ids, quirk included
    ("a fox", {"height": 48, "width": 80, "guidance_rescale": 0.7, "clip_skip": 1, "negative_prompt": "blurry"}),
])
def test_txt2img_matches_diffusers(pipe, oracle, prompt, kwargs):
    ours = pipe(prompt, steps=4, seed=3, progress=False, **kwargs).images
    theirs = oracle(prompt, num_inference_steps=4, generator=seeded(3), **kwargs).images
    _same(ours, theirs)


@pytest.mark.parametrize("scheduler", ["euler_ancestral", "dpmpp_2m_karras", "ddim", "heun", "unipc"])
def test_schedulers_match_on_sdxl(tiny_sdxl_model, pipe, scheduler):
    oracle = reference_pipeline(tiny_sdxl_model, scheduler, cls_name="StableDiffusionXLPipeline")
    ours = pipe("a fox", negative_prompt="blurry", steps=5, seed=7, scheduler=scheduler, progress=False).images
    _same(ours, oracle("a fox", negative_prompt="blurry", num_inference_steps=5, generator=seeded(7)).images)


def test_an_empty_negative_prompt_gives_zero_unconditional_inputs(pipe):
    from sdtrt import Request
    from sdtrt.runtime.pipeline import _Text

    feeds = pipe.family.conditioning(_Text(pipe), Request("a fox", height=64, width=64, guidance_scale=5.0), pipe.config)
    assert feeds["encoder_hidden_states"].shape == (2, 77, 64) and feeds["text_embeds"].shape == (2, 32)
    assert not feeds["encoder_hidden_states"][0].any() and not feeds["text_embeds"][0].any()
    assert feeds["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2


# --- img2img, inpainting, base + refiner -----------------------------------------------------------


def _picture() -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))


def _mask() -> Image.Image:
    return Image.fromarray(np.repeat(((np.arange(64) > 30) * 255).astype(np.uint8)[None, :], 64, axis=0))


@pytest.mark.parametrize("kwargs", [{}, {"strength": 0.6, "negative_prompt": "x", "num_images_per_prompt": 2},
                                    {"negative_original_size": (32, 32), "crops_coords_top_left": (2, 2)}])
def test_img2img_matches_diffusers(tiny_sdxl_model, pipe, kwargs):
    oracle = reference_pipeline(tiny_sdxl_model, cls_name="StableDiffusionXLImg2ImgPipeline")
    ours = pipe("a fox", image=_picture(), steps=6, seed=5, progress=False, **kwargs).images  # default strength 0.3, as diffusers
    _same(ours, oracle("a fox", image=_picture(), num_inference_steps=6, generator=seeded(5), **kwargs).images)


@pytest.mark.parametrize("kwargs", [{}, {"strength": 0.7}, {"strength": 1.0, "num_images_per_prompt": 2}])
def test_inpainting_matches_diffusers(tiny_sdxl_model, pipe, kwargs):
    oracle = reference_pipeline(tiny_sdxl_model, cls_name="StableDiffusionXLInpaintPipeline")
    ours = pipe("a fox", image=_picture(), mask_image=_mask(), steps=6, seed=5, progress=False, **kwargs).images
    _same(ours, oracle("a fox", image=_picture(), mask_image=_mask(), num_inference_steps=6, generator=seeded(5), **kwargs).images)


@pytest.mark.parametrize("scheduler", ["euler", "heun"])
def test_base_hands_latents_to_the_refiner_like_diffusers(tiny_sdxl_model, tiny_sdxl_refiner_model, tiny_sdxl_refiner_onnx, pipe, scheduler):
    """denoising_end on the base, output_type='latent', then denoising_start on the refiner (img2img on latents)."""
    base_oracle = reference_pipeline(tiny_sdxl_model, scheduler, cls_name="StableDiffusionXLPipeline")
    refiner_oracle = reference_pipeline(tiny_sdxl_refiner_model, scheduler, cls_name="StableDiffusionXLImg2ImgPipeline")
    ours = pipe("a fox", steps=8, denoising_end=0.7, output_type="latent", seed=5, scheduler=scheduler, progress=False).latents
    theirs = base_oracle("a fox", num_inference_steps=8, denoising_end=0.7, output_type="latent", generator=seeded(5)).images
    assert ours.shape == (1, 4, 8, 8) and torch.allclose(ours, theirs, atol=1e-3)
    refiner = Pipeline.load(tiny_sdxl_refiner_onnx)
    image = refiner("a fox", image=ours, steps=8, denoising_start=0.7, seed=5, scheduler=scheduler, progress=False).images
    _same(image, refiner_oracle("a fox", image=theirs, num_inference_steps=8, denoising_start=0.7, generator=seeded(5)).images)


def test_refiner_img2img_with_aesthetic_scores_matches(tiny_sdxl_refiner_model, tiny_sdxl_refiner_onnx):
    oracle = reference_pipeline(tiny_sdxl_refiner_model, cls_name="StableDiffusionXLImg2ImgPipeline")
    kw = {"aesthetic_score": 7.0, "negative_aesthetic_score": 2.0, "negative_prompt": "blurry", "strength": 0.5}
    ours = Pipeline.load(tiny_sdxl_refiner_onnx)("a fox", image=_picture(), steps=6, seed=2, progress=False, **kw).images
    _same(ours, oracle("a fox", image=_picture(), num_inference_steps=6, generator=seeded(2), **kw).images)


# --- refusals ------------------------------------------------------------------------------------------


def test_sdxl_parameters_on_an_sd_model_are_refused(tiny_onnx):
    with pytest.raises(SdtrtError, match="prompt_2.*SDXL parameter"):
        Pipeline.load(tiny_onnx)("a fox", prompt_2="a dog", steps=2, progress=False)


def test_denoising_start_without_an_image_is_refused(pipe):
    with pytest.raises(SdtrtError, match="denoising_start.*needs image="):
        pipe("a fox", denoising_start=0.5, steps=2, progress=False)


def test_an_sdxl_unet_in_an_sd_folder_is_refused(tiny_sdxl_model, tmp_path):
    import shutil

    from sdtrt.export import export_model

    folder = shutil.copytree(tiny_sdxl_model, tmp_path / "m")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(SdtrtError, match="SDXL's added conditioning"):
        export_model(folder, tmp_path / "o", show_progress=False)


# --- engines -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("static", [True, False])
def test_tiny_sdxl_builds_tensorrt_rtx_engines(tiny_sdxl_onnx, tmp_path, static):
    pytest.importorskip("tensorrt_rtx", reason="engine builds need the tensorrt-rtx package")
    from sdtrt.engines.build import build_engines

    sizes = {"batch": "1", "height": "64", "width": "64"} if static else {"batch": "1:1:2", "height": "48:64:96", "width": "48:64:96"}
    out = build_engines(tiny_sdxl_onnx, tmp_path / "e", target="sm89", components=["text_encoder_2", "unet"],
                        cache=tmp_path / "cache", show_progress=False, log=lambda *_: None, **sizes)
    engines = open_model_dir(out).manifest.engines
    profile = engines["unet"].profile
    assert profile["time_ids"][2] == [2 if static else 4, 6] and profile["text_embeds"][2][1] == 32
    assert engines["text_encoder_2"].profile["input_ids"][2] == [2 if static else 4, 77]  # prompts + negatives


def test_a1111_syntax_works_on_both_encoders(pipe):
    """Without weights and within 75 tokens it is exactly the plain path; longer prompts reach the UNet as 77 x chunks."""
    plain = pipe("a watercolor fox", negative_prompt="blurry", steps=3, seed=1, progress=False, output_type="tensor").tensors
    a1111 = pipe("a watercolor fox", negative_prompt="blurry", steps=3, seed=1, progress=False, output_type="tensor",
                 prompt_syntax="a1111").tensors
    assert torch.equal(plain, a1111)
    from sdtrt import Request
    from sdtrt.runtime.pipeline import _Text

    long = ", ".join(["a very detailed watercolor fox"] * 20) + ", (red:1.4)"
    feeds = pipe.family.conditioning(_Text(pipe), Request(long, "blurry", prompt_syntax="a1111", height=64, width=64), pipe.config)
    assert feeds["encoder_hidden_states"].shape == (2, 154, 64) and feeds["text_embeds"].shape == (2, 32)
    assert pipe(long, negative_prompt="blurry", steps=2, seed=1, progress=False, prompt_syntax="a1111").images[0].size == (64, 64)


def test_generate_runs_sdxl_with_its_flags_and_a_refiner(tiny_sdxl_onnx, tiny_sdxl_refiner_onnx, tiny_sdxl_model, tiny_sdxl_refiner_model, tmp_path):
    """--prompt-2 / size conditioning reach the pipeline; --refiner is diffusers' base -> refiner hand-off."""
    from sdtrt.cli import main as cli

    common = ["--steps", "6", "--seed", "4", "--no-progress", "--negative-prompt", "blurry"]
    assert cli(["generate", "a fox", "--model", str(tiny_sdxl_onnx), "--prompt-2", "a dog", "--original-size", "96x128",
                "--crops-coords-top-left", "8x4", *common, "--out", str(tmp_path / "a.png")]) == 0
    theirs = reference_pipeline(tiny_sdxl_model, cls_name="StableDiffusionXLPipeline")(
        "a fox", prompt_2="a dog", original_size=(96, 128), crops_coords_top_left=(8, 4), negative_prompt="blurry",
        num_inference_steps=6, generator=seeded(4)).images
    _same([Image.open(tmp_path / "a.png").convert("RGB")], theirs)
    assert cli(["generate", "a fox", "--model", str(tiny_sdxl_onnx), "--refiner", str(tiny_sdxl_refiner_onnx),
                "--refiner-start", "0.7", *common, "--out", str(tmp_path / "b.png")]) == 0
    base = reference_pipeline(tiny_sdxl_model, cls_name="StableDiffusionXLPipeline")
    refiner = reference_pipeline(tiny_sdxl_refiner_model, cls_name="StableDiffusionXLImg2ImgPipeline")
    latents = base("a fox", negative_prompt="blurry", num_inference_steps=6, denoising_end=0.7, output_type="latent", generator=seeded(4)).images
    theirs = refiner("a fox", negative_prompt="blurry", image=latents, num_inference_steps=6, denoising_start=0.7, generator=seeded(4)).images
    _same([Image.open(tmp_path / "b.png").convert("RGB")], theirs)
