"""sdtrt: Stable Diffusion to ONNX and TensorRT engines, run by a lean Torch runtime."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

# diffusers warns on every import that optimum-onnx and optimum both provide "optimum" (true, harmless).
logging.getLogger("diffusers.utils.import_utils").setLevel(logging.ERROR)

__all__ = ["Pipeline", "Request", "__version__"]


def __getattr__(name: str):
    # Lazy: `import sdtrt` must not pull torch-heavy modules for CLI --help.
    if name == "Pipeline":
        from .runtime.pipeline import Pipeline

        return Pipeline
    if name == "Request":
        from .runtime.request import Request

        return Request
    raise AttributeError(name)
