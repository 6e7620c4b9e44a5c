"""sdtrt: Stable Diffusion to ONNX and TensorRT engines, run by a lean Torch runtime."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Pipeline", "__version__"]


def __getattr__(name: str):
    # Lazy: `import sdtrt` must not pull torch-heavy modules for CLI --help.
    if name == "Pipeline":
        from .runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
