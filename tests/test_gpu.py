"""What only a GPU can show. Each test runs where CUDA and the library it needs exist and is
skipped with the reason elsewhere (CI and development machines here have no GPU)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from sdtrt import Pipeline
from sdtrt.engines.build import build_engines
from sdtrt.engines.toolkit import RTX_TARGETS, local_gpu_target
from tests.helpers import psnr

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (none visible)")


def _engine_library() -> str | None:
    """A library that can build for this GPU: tensorrt, or tensorrt-rtx where it targets the GPU."""
    if importlib.util.find_spec("tensorrt") is not None:
        return "tensorrt"
    if importlib.util.find_spec("tensorrt_rtx") is not None and local_gpu_target() in RTX_TARGETS:
        return "tensorrt-rtx"
    return None


needs_engines = pytest.mark.skipif(not HAS_CUDA or _engine_library() is None,
                                   reason="needs a GPU and a TensorRT library that builds for it (tensorrt; or tensorrt-rtx on sm75-sm121 but not sm90)")

PROMPTS = ["a watercolor fox", "a red bicycle"]


def _images(pipe, **kw):
    return pipe(PROMPTS, negative_prompt=["blurry", "ugly"], steps=6, seed=4, scheduler="dpmpp_2m", progress=False, **kw).images


@needs_engines
@pytest.mark.gpu
@pytest.mark.parametrize("fixture,min_psnr", [("tiny_onnx", 45.0), ("tiny_onnx_fp16", 40.0)])
def test_engine_pipeline_matches_onnxruntime(fixture, min_psnr, request, tmp_path):
    onnx_dir = request.getfixturevalue(fixture)
    engines = build_engines(onnx_dir, tmp_path / "eng", backend=_engine_library(), batch="1:2:2", cache=tmp_path / "c", show_progress=False)
    ours = _images(Pipeline.load(engines))
    reference = _images(Pipeline.load(onnx_dir, backend="onnxruntime"))
    assert all(psnr(a, b) >= min_psnr for a, b in zip(ours, reference))


@needs_engines
@pytest.mark.gpu
def test_cuda_graphs_give_the_same_images(tiny_onnx_fp16, tmp_path):
    engines = build_engines(tiny_onnx_fp16, tmp_path / "eng", backend=_engine_library(), batch="1:2:2", cache=tmp_path / "c", show_progress=False)
    plain = _images(Pipeline.load(engines))
    graphed = _images(Pipeline.load(engines, cuda_graphs=True))
    assert all(psnr(a, b) >= 45 for a, b in zip(plain, graphed))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="needs the full tensorrt package (not installable from the registries reachable here)")
def test_timing_cache_is_written_then_reused(tiny_onnx, tmp_path):
    cache_file = tmp_path / "timing.cache"
    build_engines(tiny_onnx, tmp_path / "a", backend="tensorrt", components=["unet"], timing_cache=cache_file, use_cache=False, show_progress=False)
    first = cache_file.read_bytes()
    assert len(first) > 1000
    build_engines(tiny_onnx, tmp_path / "b", backend="tensorrt", components=["unet"], timing_cache=cache_file, use_cache=False, show_progress=False)
    assert json.loads((tmp_path / "b" / "engines.json").read_text())["flags"]["timing_cache"] == str(cache_file)
    assert len(cache_file.read_bytes()) >= len(first)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in (importlib.util.find_spec("onnxruntime") and __import__("onnxruntime").get_available_providers()),
                    reason="needs onnxruntime-gpu (the CUDA execution provider)")
def test_onnxruntime_cuda_provider_matches_cpu(tiny_onnx):
    cuda = _images(Pipeline.load(tiny_onnx, backend="onnxruntime", device="cuda"))
    cpu = _images(Pipeline.load(tiny_onnx, backend="onnxruntime"))
    assert all(psnr(a, b) >= 40 for a, b in zip(cuda, cpu))


@needs_engines
@pytest.mark.gpu
def test_loras_and_embeddings_refit_engines_like_onnxruntime(tiny_onnx, tmp_path):
    """set_loras / load_textual_inversion on --refit engines give ONNX Runtime's images (refit by weight name)."""
    from safetensors.torch import save_file

    from tests.test_adapters import kohya_lora
    from tests.test_adapter_formats import family_config
    from sdtrt.adapters import weights_for

    engines = build_engines(tiny_onnx, tmp_path / "eng", backend=_engine_library(), batch="1:2:2", refit=True,
                            cache=tmp_path / "c", show_progress=False)
    lora = kohya_lora(tmp_path / "l.safetensors", weights_for(family_config(open_model_dir_source(tiny_onnx))))
    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "e.safetensors"))
    results = []
    for pipe in (Pipeline.load(engines), Pipeline.load(tiny_onnx, backend="onnxruntime")):
        pipe.load_textual_inversion(tmp_path / "e.safetensors", token="<e>")
        pipe.set_loras([(lora, 0.7)])
        results.append(pipe(["a <e> fox", "a red bicycle"], negative_prompt=["blurry", "ugly"], steps=6, seed=4, progress=False).images)
        pipe.set_loras([])
    assert all(psnr(a, b) >= 40 for a, b in zip(*results))


def open_model_dir_source(onnx_dir):
    from sdtrt.artifacts import open_model_dir

    return open_model_dir(onnx_dir).meta.source.path


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True], ids=["eager-launch", "cuda-graphs"])
def test_aoti_fp16_on_cuda_matches_diffusers_fp16(tiny_model, tiny_onnx, tmp_path, graphs):
    """AOTInductor packages compiled for this GPU in fp16 (with and without CUDA graphs) make diffusers' fp16 image."""
    pytest.importorskip("diffusers", reason="the GPU machine brings diffusers as a wheel (scripts/gpu-check)")
    from sdtrt.engines.aoti import build_aoti

    packages = build_aoti(tiny_onnx, tmp_path / "aoti", device="cuda", dtype="fp16", batch="1:2:2", components=["text_encoder", "unet", "vae_decoder"],
                          show_progress=False, log=lambda *_: None)
    ours = _images(Pipeline.load(packages, cuda_graphs=graphs))
    oracle = __import__("diffusers").StableDiffusionPipeline.from_pretrained(tiny_model, torch_dtype=torch.float16).to("cuda")
    oracle.scheduler = __import__("diffusers").DPMSolverMultistepScheduler.from_config(oracle.scheduler.config)
    theirs = oracle(PROMPTS, negative_prompt=["blurry", "ugly"], num_inference_steps=6,
                    generator=torch.Generator("cpu").manual_seed(4)).images
    assert all(psnr(a, b) >= 35 for a, b in zip(ours, theirs))  # fp16 on both sides: kernels differ in rounding
