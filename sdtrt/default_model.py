"""The embedded default: a tiny random-weight model, made and exported once into a cache folder,
so `sdtrt generate "a prompt"` works on a fresh machine with no model at hand."""

from __future__ import annotations

from pathlib import Path

from .files import cache_dir


def default_onnx_dir(log=print) -> Path:
    """cache/tiny-onnx, created on first use (tiny preset -> export fp32); a minute on a CPU."""
    from .export import export_model
    from .presets import make_model

    root = cache_dir()
    onnx_dir = root / "tiny-onnx"
    if (onnx_dir / "sdtrt.json").is_file():
        return onnx_dir
    model_dir = root / "tiny"
    if not (model_dir / "model_index.json").is_file():
        log(f"no --model given: making the tiny demo model in {model_dir} (random weights, once)")
        make_model("tiny", model_dir, force=True)
    log(f"exporting it to ONNX in {onnx_dir} (once)")
    export_model(model_dir, onnx_dir, force=True, log=lambda *_: None)
    return onnx_dir
