"""sdtrt: Stable Diffusion (diffusers format) to validated ONNX and TensorRT engines, run by a lean Torch runtime.

Where things live:
  cli.py, outputs.py     the `sdtrt` command; image files out (PNG/JPEG/WebP with A1111 parameters)
  models/                what each network and family is: specs, components, families (sd, sdxl), presets
  export/                diffusers folder -> ONNX dir (trace, clean, validate against torch)
  engines/               ONNX dir -> engine dir (TensorRT / TensorRT-RTX, profiles, cache, worker process)
  runtime/               request -> images: text, schedulers, denoising loop with hooks, backends
  artifacts.py           sdtrt.json / engines.json: typed, versioned, the only reader and writer
  files.py, signals.py   atomic writes, umask, cache dir, hashing; Ctrl-C / SIGTERM exit codes
  inspect.py             what a directory holds, and whether its files are intact
"""

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
