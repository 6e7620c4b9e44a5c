"""Backends: `load(name, model_dir, ...)` returns an object following `base.Backend`."""

from __future__ import annotations

from typing import Any

from ...errors import SdtrtError
from ...artifacts import ModelDir
from .base import Backend

BACKENDS = ("onnxruntime", "tensorrt", "aoti")


def load(name: str, model: ModelDir, preload: str | None = None, **options: Any) -> Backend:
    """`preload` (ONNX Runtime: "default", "none", "all") says which sessions to create now; the engine
    backends load what they load, so they ignore it."""
    if name == "auto":
        name = "onnxruntime" if model.kind != "engines" else ("aoti" if model.manifest.backend.name == "aoti" else "tensorrt")
    if name == "onnxruntime" and preload is not None:
        options["preload"] = preload
    if name == "onnxruntime":
        if model.kind == "engines":
            raise SdtrtError(f"{model.root} holds TensorRT engines, which ONNX Runtime cannot run.",
                             "use backend='tensorrt', or point at the ONNX directory the engines were built from")
        from .onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model, **options)
    if name == "aoti":
        if model.kind != "engines" or model.manifest.backend.name != "aoti":
            raise SdtrtError(f"{model.root} holds no AOTInductor packages.",
                             f"compile them first: sdtrt build {model.root} --backend aoti --out DIR (or use backend='onnxruntime')")
        from .aoti import AotiBackend

        return AotiBackend(model, **options)
    if name == "tensorrt":
        if model.kind == "engines" and model.manifest.backend.name == "aoti":
            raise SdtrtError(f"{model.root} holds AOTInductor packages.", "use backend='aoti' (or 'auto')")
        if model.kind != "engines":
            raise SdtrtError(f"{model.root} is an ONNX directory; the tensorrt backend runs engines.",
                             f"build engines first: sdtrt build {model.root} --out ENGINE_DIR (or use backend='onnxruntime')")
        from .tensorrt import TensorRTBackend

        return TensorRTBackend(model, **options)
    raise SdtrtError(f"unknown backend {name!r}.", f"choose one of: auto, {', '.join(BACKENDS)}")


__all__ = ["Backend", "BACKENDS", "load"]
