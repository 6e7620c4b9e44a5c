"""Shared fixtures: one tiny model and its exports per test session (seconds on a CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session", autouse=True)
def _own_cache(tmp_path_factory):
    """Tests write their caches (default model, engines, ONNX Runtime's optimized graphs) in a folder of
    their own, never the user's ~/.cache/sdtrt; subprocesses inherit it."""
    if "SDTRT_CACHE" not in os.environ:
        os.environ["SDTRT_CACHE"] = str(tmp_path_factory.mktemp("sdtrt-cache"))
    yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sdtrt.models.presets import make_model

    return make_model("tiny", tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_model, tmp_path_factory) -> Path:
    """fp32 export of all four components, validated."""
    from sdtrt.export import export_model

    return export_model(tiny_model, tmp_path_factory.mktemp("onnx") / "fp32",
                        components=["text_encoder", "unet", "vae_decoder", "vae_encoder"], show_progress=False)


@pytest.fixture(scope="session")
def tiny_onnx_fp16(tiny_model, tmp_path_factory) -> Path:
    from sdtrt.export import export_model

    return export_model(tiny_model, tmp_path_factory.mktemp("onnx") / "fp16", dtype="fp16", show_progress=False)


@pytest.fixture(scope="session")
def tiny_inpaint_model(tmp_path_factory) -> Path:
    from sdtrt.models.presets import make_model

    return make_model("tiny-inpaint", tmp_path_factory.mktemp("models") / "tiny-inpaint", seed=0)


@pytest.fixture(scope="session")
def tiny_inpaint_onnx(tiny_inpaint_model, tmp_path_factory) -> Path:
    from sdtrt.export import export_model

    return export_model(tiny_inpaint_model, tmp_path_factory.mktemp("onnx") / "inpaint",
                        components=["text_encoder", "unet", "vae_decoder", "vae_encoder"], show_progress=False)


@pytest.fixture(scope="session")
def tiny_sd2_model(tmp_path_factory) -> Path:
    from sdtrt.models.presets import make_model

    return make_model("tiny-sd2", tmp_path_factory.mktemp("models") / "tiny-sd2", seed=0)


@pytest.fixture(scope="session")
def tiny_sd2_onnx(tiny_sd2_model, tmp_path_factory) -> Path:
    from sdtrt.export import export_model

    return export_model(tiny_sd2_model, tmp_path_factory.mktemp("onnx") / "sd2", show_progress=False)


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory) -> Path:
    from sdtrt.models.presets import make_model

    return make_model("tiny-sdxl", tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_onnx(tiny_sdxl_model, tmp_path_factory) -> Path:
    """fp32 export of both text encoders, the UNet and both VAE halves, validated."""
    from sdtrt.export import export_model

    return export_model(tiny_sdxl_model, tmp_path_factory.mktemp("onnx") / "sdxl",
                        components=["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"], show_progress=False)


@pytest.fixture(scope="session")
def tiny_sdxl_refiner_model(tmp_path_factory) -> Path:
    from sdtrt.models.presets import make_model

    return make_model("tiny-sdxl-refiner", tmp_path_factory.mktemp("models") / "tiny-sdxl-refiner", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_refiner_onnx(tiny_sdxl_refiner_model, tmp_path_factory) -> Path:
    from sdtrt.export import export_model

    return export_model(tiny_sdxl_refiner_model, tmp_path_factory.mktemp("onnx") / "sdxl-refiner",
                        components=["text_encoder_2", "unet", "vae_decoder", "vae_encoder"], show_progress=False)


@pytest.fixture(scope="session")
def tiny_controlnets(tmp_path_factory) -> list[Path]:
    """Two ControlNets for `tiny` (different seeds): names 'edges' and 'depth' in the export below."""
    from sdtrt.models.presets import make_model

    root = tmp_path_factory.mktemp("controlnets")
    return [make_model("tiny-controlnet", root / name, seed=seed) for name, seed in (("edges", 0), ("depth", 1))]


@pytest.fixture(scope="session")
def tiny_controlnet_onnx(tiny_model, tiny_controlnets, tmp_path_factory) -> Path:
    from sdtrt.export import export_model

    return export_model(tiny_model, tmp_path_factory.mktemp("onnx") / "controlnet",
                        components=["text_encoder", "unet", "vae_decoder", "vae_encoder", "controlnet_edges", "controlnet_depth"],
                        controlnets=[(p, p.name) for p in tiny_controlnets], show_progress=False)


@pytest.fixture(scope="session")
def tiny_taiyi_model(tmp_path_factory) -> Path:
    from sdtrt.models.presets import make_model

    return make_model("tiny-taiyi", tmp_path_factory.mktemp("models") / "tiny-taiyi", seed=0)


@pytest.fixture(scope="session")
def tiny_taiyi_onnx(tiny_taiyi_model, tmp_path_factory) -> Path:
    """fp32 export of the BERT text encoder, the UNet (512-token text axis) and both VAE halves, validated."""
    from sdtrt.export import export_model

    return export_model(tiny_taiyi_model, tmp_path_factory.mktemp("onnx") / "taiyi",
                        components=["text_encoder", "unet", "vae_decoder", "vae_encoder"], show_progress=False)


@pytest.fixture(scope="session")
def tiny_upscaler_model(tmp_path_factory) -> Path:
    from sdtrt.models.presets import make_model

    return make_model("tiny-upscaler", tmp_path_factory.mktemp("models") / "tiny-upscaler", seed=0)


@pytest.fixture(scope="session")
def tiny_upscaler_onnx(tiny_upscaler_model, tmp_path_factory) -> Path:
    """fp32 export of the text encoder, the 7-channel UNet (noise-level class labels) and the x4 VAE decoder, validated."""
    from sdtrt.export import export_model

    return export_model(tiny_upscaler_model, tmp_path_factory.mktemp("onnx") / "upscaler", show_progress=False)


@pytest.fixture(scope="session")
def tiny_depth2img_model(tmp_path_factory) -> Path:
    from sdtrt.models.presets import make_model

    return make_model("tiny-depth2img", tmp_path_factory.mktemp("models") / "tiny-depth2img", seed=0)


@pytest.fixture(scope="session")
def tiny_depth2img_onnx(tiny_depth2img_model, tmp_path_factory) -> Path:
    """fp32 export of the text encoder, the 5-channel UNet, both VAE halves and the DPT depth estimator, validated."""
    from sdtrt.export import export_model

    return export_model(tiny_depth2img_model, tmp_path_factory.mktemp("onnx") / "depth2img", show_progress=False)


@pytest.fixture(scope="session")
def tiny_unclip_model(tmp_path_factory) -> Path:
    from sdtrt.models.presets import make_model

    return make_model("tiny-unclip", tmp_path_factory.mktemp("models") / "tiny-unclip", seed=0)


@pytest.fixture(scope="session")
def tiny_unclip_onnx(tiny_unclip_model, tmp_path_factory) -> Path:
    """fp32 export of the text encoder, the class-conditioned UNet, the VAE decoder and the CLIP image encoder, validated."""
    from sdtrt.export import export_model

    return export_model(tiny_unclip_model, tmp_path_factory.mktemp("onnx") / "unclip", show_progress=False)
