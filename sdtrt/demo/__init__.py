"""`sdtrt demo`: a Gradio web page in front of one loaded model - text to image, image to image and
inpainting (the mask painted in the browser), a queue, per-step progress, PNG downloads that keep their
generation parameters, and a Chinese / English switch (Chinese by default for a Taiyi model).

    app.py    the page (gradio.Blocks), the handlers, launching
    i18n.py   the two languages: labels, messages, example prompts

Gradio is imported only when the demo runs (`pip install 'sdtrt[demo]'`); importing this package does not.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


def default_model_dir(log=print) -> Path:
    """The embedded tiny model, exported with the VAE encoder too (the default export for `sdtrt generate` has
    none, and image to image and inpainting need it): cache/default/<key>/onnx-demo, made once and reused while
    it comes from the same weights as the default export."""
    from ..artifacts import open_model_dir
    from ..default_model import default_onnx_dir, exported_once

    base = default_onnx_dir(log=log)
    onnx = base.parent / "onnx-demo"
    return exported_once(base.parent / "model", onnx, open_model_dir(base).meta.source.sha256,
                         lambda: log(f"exporting it with a VAE encoder (image to image, inpainting) to {onnx} (once)"),
                         components=COMPONENTS)


def run(model_dir: Path | None, *, host: str, port: int, share: bool, lang: str | None, outdir: Path | None,
        backend: str = "auto", backend_options: dict[str, Any] | None = None, max_queue: int = 32) -> None:
    """Load the model (the embedded tiny one without `model_dir`), serve the page until Ctrl-C / SIGTERM."""
    from ..artifacts import open_model_dir
    from ..errors import require

    require("gradio", "demo", "sdtrt demo")
    if outdir is not None:
        from ..outputs import plan

        plan(str(outdir) + "/", 1)  # writable? (checked before the model is made or loaded)
    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    model = model_dir or default_model_dir(log=say)
    open_model_dir(model)  # a wrong folder fails here, in one line, before anything starts
    from ..runtime.pipeline import Pipeline
    from .app import launch, serve_forever

    pipe = Pipeline.load(model, backend=backend, **(backend_options or {}))
    warnings.filterwarnings("ignore", message=".*HTTP_422_UNPROCESSABLE_ENTITY")  # Gradio's, once per queued request
    name = Path(model).resolve().name if model_dir else "sdtrt-tiny-demo"
    server = launch(pipe, host=host, port=port, share=share, lang=lang, outdir=outdir, model_name=name,
                    backend=pipe.backend.name, max_queue=max_queue)
    serve_forever(server)
