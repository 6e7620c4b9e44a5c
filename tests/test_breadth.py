"""img2img, inpainting (4- and 9-channel UNets), SD 2.x, long prompts and prompt weights.

Parity oracle: diffusers' StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline /
StableDiffusionPipeline on the same tiny models, schedulers and seeds: PSNR >= 45 dB (uint8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrt import Pipeline
from sdtrt.errors import SdtrtError
from sdtrt.runtime.text import prompt_weights as pw
from tests.helpers import psnr, reference_pipeline, seeded

MIN_PSNR = 45.0
PROMPTS = ["a watercolor fox", "a red bicycle!"]
NEGATIVES = ["blurry", "ugly"]


def _picture(w: int = 64, h: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def _mask(w: int = 64, h: int = 64) -> Image.Image:
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : 3 * h // 4, w // 3 : w - 8] = 255
    return Image.fromarray(m)


def _same(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert psnr(a, b) >= MIN_PSNR


@pytest.fixture(scope="module")
def pipe(tiny_onnx):
    return Pipeline.load(tiny_onnx)


# --- img2img --------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["euler_ancestral", "pndm", "dpmpp_2m"])
@pytest.mark.parametrize("strength", [0.3, 0.8])
def test_img2img_matches_diffusers(pipe, tiny_model, scheduler, strength):
    image = _picture()
    ours = pipe(PROMPTS, negative_prompt=NEGATIVES, image=image, strength=strength, steps=8, scheduler=scheduler, seed=3, progress=False)
    ref = reference_pipeline(tiny_model, scheduler, cls_name="StableDiffusionImg2ImgPipeline")
    theirs = ref(PROMPTS, negative_prompt=NEGATIVES, image=image, strength=strength, num_inference_steps=8, generator=seeded(3)).images
    _same(ours.images, theirs)
    assert ours.timings["unet_calls"] < 9  # strength skips the start of the schedule


def test_img2img_with_heun_and_two_images_per_prompt(pipe, tiny_model):
    image = _picture(seed=2)
    ours = pipe("a fox", image=image, strength=0.6, steps=5, scheduler="heun", num_images_per_prompt=2, seed=1, progress=False)
    ref = reference_pipeline(tiny_model, "heun", cls_name="StableDiffusionImg2ImgPipeline")
    theirs = ref("a fox", image=image, strength=0.6, num_inference_steps=5, num_images_per_prompt=2, generator=seeded(1)).images
    _same(ours.images, theirs)


# --- inpainting -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "euler_ancestral"])
@pytest.mark.parametrize("strength", [0.3, 0.8, 1.0])
def test_inpainting_with_a_4_channel_unet_blends_latents_like_diffusers(pipe, tiny_model, scheduler, strength):
    image, mask = _picture(seed=4), _mask()
    ours = pipe(PROMPTS, negative_prompt=NEGATIVES, image=image, mask_image=mask, strength=strength, steps=8,
                scheduler=scheduler, seed=5, progress=False)
    ref = reference_pipeline(tiny_model, scheduler, cls_name="StableDiffusionInpaintPipeline")
    theirs = ref(PROMPTS, negative_prompt=NEGATIVES, image=image, mask_image=mask, strength=strength, num_inference_steps=8,
                 generator=seeded(5)).images
    _same(ours.images, theirs)


@pytest.mark.parametrize("scheduler", ["pndm", "dpmpp_2m_karras"])
@pytest.mark.parametrize("strength", [0.3, 0.8, 1.0])
def test_inpainting_with_a_9_channel_unet_matches_diffusers(tiny_inpaint_onnx, tiny_inpaint_model, scheduler, strength):
    image, mask = _picture(seed=6), _mask()
    ours = Pipeline.load(tiny_inpaint_onnx)(PROMPTS, negative_prompt=NEGATIVES, image=image, mask_image=mask, strength=strength,
                                            steps=8, scheduler=scheduler, seed=7, progress=False)
    ref = reference_pipeline(tiny_inpaint_model, scheduler, cls_name="StableDiffusionInpaintPipeline")
    theirs = ref(PROMPTS, negative_prompt=NEGATIVES, image=image, mask_image=mask, strength=strength, num_inference_steps=8,
                 generator=seeded(7)).images
    _same(ours.images, theirs)


# --- SD 2.x ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", [None, "euler", "dpmpp_2m_karras"])
def test_sd2_v_prediction_matches_diffusers(tiny_sd2_onnx, tiny_sd2_model, scheduler):
    """v-prediction (DDIM config), '!' padding: a literal '!' in the prompt becomes id 0 as in diffusers."""
    ours = Pipeline.load(tiny_sd2_onnx)(PROMPTS, negative_prompt=NEGATIVES, steps=6, scheduler=scheduler, seed=8, progress=False)
    theirs = reference_pipeline(tiny_sd2_model, scheduler)(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=6, generator=seeded(8)).images
    _same(ours.images, theirs)


# --- long prompts and weights ---------------------------------------------------------------------


def test_short_unweighted_prompt_is_identical_in_both_syntaxes(pipe):
    kw = dict(negative_prompt="blurry", steps=4, seed=9, progress=False)
    plain = pipe("a fox in the snow, highly detailed", **kw)
    a1111 = pipe("a fox in the snow, highly detailed", prompt_syntax="a1111", **kw)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(a1111.images[0]))


def test_long_prompt_is_chunked_and_reaches_the_unet(pipe, monkeypatch):
    seen = []
    run = pipe.backend.run

    def spy(component, feeds):
        if component == "unet":
            seen.append(tuple(feeds["encoder_hidden_states"].shape))
        return run(component, feeds)

    monkeypatch.setattr(pipe.backend, "run", spy)
    long = ", ".join(["a very detailed watercolor fox"] * 20)  # ~120 tokens
    truncated = pipe(long, steps=2, seed=1, progress=False)
    chunked = pipe(long, steps=2, seed=1, prompt_syntax="a1111", progress=False)
    assert seen[0] == (2, 77, 32) and seen[-1] == (2, 154, 32)  # uncond padded to the same 2 chunks
    assert not np.array_equal(np.asarray(truncated.images[0]), np.asarray(chunked.images[0]))


def test_weights_change_the_image_and_weight_one_does_not(pipe):
    kw = dict(steps=3, seed=2, progress=False, prompt_syntax="a1111")
    base = np.asarray(pipe("a fox in snow", **kw).images[0])
    assert np.array_equal(base, np.asarray(pipe("a (fox:1.0) in snow", **kw).images[0]))
    assert not np.array_equal(base, np.asarray(pipe("a (fox:1.5) in snow", **kw).images[0]))


@pytest.mark.parametrize("prompt,expected", [
    ("plain text", [("plain text", 1.0)]),
    ("a (cat) b", [("a ", 1.0), ("cat", 1.1), (" b", 1.0)]),
    ("((cat))", [("cat", 1.1 * 1.1)]),
    ("[cat]", [("cat", 1 / 1.1)]),
    ("(cat:1.5)", [("cat", 1.5)]),
    ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),
    ("[(cat)]", [("cat", 1.0)]),
    (r"\(not weighted\) \[x\] \\", [("(not weighted) [x] \\", 1.0)]),
    ("(unclosed words", [("unclosed words", 1.1)]),
    ("stray) bracket]", [("stray) bracket]", 1.0)]),
    ("a:b (c:x)", [("a:b ", 1.0), ("c:x", 1.1)]),
    ("one BREAK two", [("one", 1.0), ("BREAK", -1.0), ("two", 1.0)]),
    ("", [("", 1.0)]),
])
def test_weight_parsing(prompt, expected):
    got = pw.parse(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_chunks_are_75_tokens_wrapped_with_bos_eos_and_break_starts_a_new_one(pipe):
    tok = pipe.tokenizer
    c = pw.chunk(tok, "word " * 100)
    assert c.ids.shape == (2, 77) and c.ids[0, 0] == 49406 and c.ids[0, 76] == 49407 and c.ids[1, 26] == 49407
    assert pw.chunk(tok, "a BREAK b").ids.shape == (2, 77)
    plain = tok.encode("a fox")[0]
    assert torch.equal(pw.chunk(tok, "a fox").ids[0], plain)


def test_applied_weights_keep_each_chunks_mean():
    z = torch.randn(2, 77, 8) + 0.3
    w = torch.ones(2, 77)
    w[0, 3:6] = 1.4
    out = pw.apply_weights(z, w)
    assert torch.allclose(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)), atol=1e-6)
    assert torch.equal(out[1], z[1] * (out[1].mean() / z[1].mean()))  # an all-ones chunk only rescales by 1
    assert torch.equal(pw.apply_weights(z, torch.ones(2, 77)), z)


# --- bad input ------------------------------------------------------------------------------------


def test_image_and_mask_of_different_sizes_are_refused(pipe):
    with pytest.raises(SdtrtError, match="the mask is 32x32 but the image is 64x64"):
        pipe("x", image=_picture(), mask_image=_mask(32, 32), steps=2, progress=False)


def test_a_mask_that_is_not_single_channel_is_refused(pipe):
    with pytest.raises(SdtrtError, match="single-channel"):
        pipe("x", image=_picture(), mask_image=torch.ones(3, 64, 64), steps=2, progress=False)


@pytest.mark.parametrize("strength", [0.0, 1.5, -0.2, float("nan")])
def test_strength_outside_zero_one_is_refused(pipe, strength):
    with pytest.raises(SdtrtError, match=r"outside \(0, 1\]"):
        pipe("x", image=_picture(), strength=strength, steps=2, progress=False)


def test_image_size_not_a_multiple_of_8_names_the_nearest_or_resizes(pipe):
    odd = _picture(70, 61)
    with pytest.raises(SdtrtError, match="height 56 or 64, width 64 or 72"):
        pipe("x", image=odd, steps=2, progress=False)
    assert pipe("x", image=odd, resize=True, steps=2, progress=False).images[0].size == (64, 56)


def test_img2img_without_a_vae_encoder_names_the_flag(tiny_onnx_fp16):
    with pytest.raises(SdtrtError, match="--components text_encoder,unet,vae_decoder,vae_encoder"):
        Pipeline.load(tiny_onnx_fp16)("x", image=_picture(), steps=2, progress=False)


def test_unknown_prompt_syntax_is_refused(pipe):
    with pytest.raises(SdtrtError, match="a1111"):
        pipe("x", prompt_syntax="compel", steps=2, progress=False)
