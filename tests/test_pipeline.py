"""txt2img on ONNX Runtime (fp32) gives diffusers' StableDiffusionPipeline image for the same tiny
model, scheduler, settings and seed: PSNR >= 45 dB on the uint8 images (the DESIGN oracle bound;
measured values are ~89 dB to inf: at most a rounding step on a few pixels)."""

from __future__ import annotations

import ast
import concurrent.futures
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdtrt import Pipeline
from sdtrt.errors import SdtrtError
from tests.helpers import psnr, reference_pipeline, seeded

MIN_PSNR = 45.0
PROMPTS = ["a watercolor fox in the snow", "a red bicycle, studio light"]
NEGATIVES = ["blurry", "low quality, text"]


@pytest.fixture(scope="module")
def pipe(tiny_onnx):
    return Pipeline.load(tiny_onnx, backend="onnxruntime")


def _assert_same(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        assert a.size == b.size
        assert psnr(a, b) >= MIN_PSNR


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "euler", "euler_ancestral", "heun", "lms", "dpmpp_2m_karras",
                                       "dpmpp_2m_sde", "unipc", "lcm"])
def test_batch_of_two_prompts_with_negatives_matches_diffusers(pipe, tiny_model, scheduler):
    ours = pipe(PROMPTS, negative_prompt=NEGATIVES, steps=6, guidance_scale=7.5, scheduler=scheduler, seed=11, progress=False)
    ref = reference_pipeline(tiny_model, scheduler)
    theirs = ref(PROMPTS, negative_prompt=NEGATIVES, num_inference_steps=6, guidance_scale=7.5, generator=seeded(11)).images
    _assert_same(ours.images, theirs)


def test_default_scheduler_is_the_models_own(pipe, tiny_model):
    ours = pipe("a fox", steps=5, seed=3, progress=False)
    theirs = reference_pipeline(tiny_model)("a fox", num_inference_steps=5, generator=seeded(3)).images
    assert ours.parameters[0]["sampler"] == "PLMS"
    _assert_same(ours.images, theirs)


def test_guidance_off_runs_the_unet_on_b_not_2b_and_matches(pipe, tiny_model, monkeypatch):
    batches = []
    run = pipe.backend.run

    def spy(component, feeds):
        if component == "unet":
            batches.append(feeds["sample"].shape[0])
        return run(component, feeds)

    monkeypatch.setattr(pipe.backend, "run", spy)
    ours = pipe(PROMPTS, steps=4, guidance_scale=1.0, scheduler="euler", seed=5, progress=False)
    assert set(batches) == {2}  # two prompts, no unconditional half
    theirs = reference_pipeline(tiny_model, "euler")(PROMPTS, num_inference_steps=4, guidance_scale=1.0, generator=seeded(5)).images
    _assert_same(ours.images, theirs)


def test_non_square_size_and_several_images_per_prompt(pipe, tiny_model):
    kw = dict(negative_prompt=NEGATIVES, height=48, width=96, steps=4)
    ours = pipe(PROMPTS, num_images_per_prompt=2, scheduler="dpmpp_2m", seed=9, progress=False, **kw)
    ref = reference_pipeline(tiny_model, "dpmpp_2m")
    theirs = ref(PROMPTS, num_images_per_prompt=2, num_inference_steps=4, generator=seeded(9), **{k: v for k, v in kw.items() if k != "steps"}).images
    assert ours.images[0].size == (96, 48)
    _assert_same(ours.images, theirs)


def test_guidance_rescale_and_clip_skip_match(pipe, tiny_model):
    ours = pipe("a fox", negative_prompt="ugly", steps=4, guidance_rescale=0.7, clip_skip=1, scheduler="ddim", seed=2, progress=False)
    ref = reference_pipeline(tiny_model, "ddim")
    theirs = ref("a fox", negative_prompt="ugly", num_inference_steps=4, guidance_rescale=0.7, clip_skip=1, generator=seeded(2)).images
    _assert_same(ours.images, theirs)


def test_a_list_of_generators_draws_one_row_each_like_diffusers(pipe, tiny_model):
    ours = pipe(PROMPTS, steps=3, scheduler="euler", generator=[seeded(1), seeded(2)], progress=False)
    theirs = reference_pipeline(tiny_model, "euler")(PROMPTS, num_inference_steps=3, generator=[seeded(1), seeded(2)]).images
    _assert_same(ours.images, theirs)


def test_seed_zero_is_a_seed(pipe):
    a = pipe("a fox", steps=2, seed=0, progress=False)
    b = pipe("a fox", steps=2, seed=0, progress=False)
    assert a.seed == 0 and np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_timings_cover_every_stage(pipe):
    t = pipe("a fox", steps=3, seed=1, progress=False).timings
    assert {"text_encoder", "unet", "denoise", "vae_decoder", "total"} <= set(t)
    assert t["unet_calls"] == 4  # PLMS: 3 steps, the warm-up evaluates twice
    assert 0 < t["unet"] <= t["denoise"] <= t["total"]


def test_concurrent_calls_return_the_same_images_as_serial_calls(pipe):
    """Pipeline state per call is local (scheduler, latents, buffers); sessions are thread-safe."""
    jobs = [dict(prompt=p, seed=s, scheduler=sch) for p, s, sch in
            [("a fox", 1, "euler_ancestral"), ("a cat", 2, "dpmpp_2m"), ("a dog", 3, "pndm"), ("a bird", 4, "dpmpp_2m_sde")]]

    def run(job):
        return np.asarray(pipe(job["prompt"], steps=5, seed=job["seed"], scheduler=job["scheduler"], progress=False).images[0])

    serial = [run(j) for j in jobs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(run, jobs * 2))
    for i, image in enumerate(parallel):
        assert np.array_equal(image, serial[i % len(jobs)])


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(height=100), "96 or 104"),
    (dict(width=7), "8"),
    (dict(steps=0), "steps=1 or more"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(guidance_scale=-1.0), ">= 0"),
    (dict(scheduler="dpm++ 9m"), "dpmpp_2m_karras"),
    (dict(negative_prompt=["a", "b", "c"]), "one negative prompt per prompt"),
    (dict(clip_skip=5), "clip_skip 1..2"),
    (dict(seed=1, generator=seeded(1)), "one of them"),
    (dict(generator=[seeded(1), seeded(2), seeded(3)]), "one generator per image"),
    (dict(scheduler_options={"use_karas_sigmas": True}, scheduler="euler"), "use_karras_sigmas"),
])
def test_bad_arguments_are_refused_naming_the_fix(pipe, kwargs, match):
    with pytest.raises(SdtrtError, match=match):
        pipe(PROMPTS, steps=kwargs.pop("steps", 2), progress=False, **kwargs)


def test_a_diffusers_folder_is_refused_with_the_export_command(tiny_model):
    with pytest.raises(SdtrtError, match="sdtrt export"):
        Pipeline.load(tiny_model)


def test_a_missing_backend_library_names_the_extra(tiny_onnx, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(SdtrtError, match=r"sdtrt\[onnxruntime\]"):
        Pipeline.load(tiny_onnx, backend="onnxruntime")


def test_an_onnx_dir_asked_for_the_tensorrt_backend_says_how_to_build(tiny_onnx):
    with pytest.raises(SdtrtError, match="sdtrt build"):
        Pipeline.load(tiny_onnx, backend="tensorrt")


# --- the import rule ------------------------------------------------------------------------------

RUNTIME = Path(__file__).resolve().parents[1] / "sdtrt" / "runtime"
FORBIDDEN = {"diffusers", "transformers"}


def test_runtime_source_never_imports_diffusers_or_transformers():
    offenders = []
    for path in RUNTIME.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders


def test_running_the_runtime_loads_neither_diffusers_nor_transformers(tiny_onnx):
    code = (
        "import sys; from sdtrt import Pipeline; import sdtrt.runtime.backends.tensorrt;"
        f"p = Pipeline.load({str(tiny_onnx)!r}); p('a fox', steps=2, seed=0, progress=False);"
        f"bad = {sorted(FORBIDDEN)!r}; loaded = [m for m in bad if m in sys.modules]; assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_any_multiple_of_8_works_like_diffusers_not_only_multiples_of_the_unet_depth(pipe, tiny_model):
    """56 px = 7 latents: odd, so the UNet's skip connections need exact-size upsampling (as in diffusers)."""
    ours = pipe("a fox", height=56, width=72, steps=3, scheduler="euler", seed=4, progress=False)
    theirs = reference_pipeline(tiny_model, "euler")("a fox", height=56, width=72, num_inference_steps=3, generator=seeded(4)).images
    _assert_same(ours.images, theirs)
