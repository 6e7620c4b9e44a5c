"""The embedded default: a tiny random-weight model, made and exported once into the cache folder,
so `sdtrt generate "a prompt"` works on a fresh machine with no model at hand.

The cache is keyed by what determines its content (preset, seed, sdtrt version, export options),
and an export is reused only if it was made from exactly the weights beside it (by hash)."""

from __future__ import annotations

from pathlib import Path

from . import __version__
from .files import cache_dir

PRESET, SEED = "tiny", 0


def default_onnx_dir(log=print) -> Path:
    """cache/default/<key>/onnx, created on first use (tiny preset -> fp32 export); seconds on a CPU."""
    from .export.source import inspect_source, weights_sha256
    from .models.presets import make_model

    root = cache_dir(instead="--model ONNX_DIR") / "default" / f"{PRESET}-seed{SEED}-sdtrt{__version__}-fp32"
    model_dir, onnx_dir = root / "model", root / "onnx"
    if not (model_dir / "model_index.json").is_file():
        log(f"no --model given: making the {PRESET} demo model in {model_dir} (random weights, once)")
        make_model(PRESET, model_dir, seed=SEED, force=True)
    src = inspect_source(model_dir)
    weights = weights_sha256(src.weight_files, src.path)
    return exported_once(model_dir, onnx_dir, weights, lambda: log(f"exporting it to ONNX in {onnx_dir} (once)"))


def exported_once(model_dir: Path, onnx_dir: Path, weights: str, announce, **export_options) -> Path:
    """`onnx_dir` if it was exported from these weights (sha256); otherwise exported now, replacing whatever
    is there (missing, damaged, from other weights or another sdtrt), after `announce()`."""
    from .artifacts import open_model_dir
    from .errors import SdtrtError
    from .export import export_model

    try:
        if open_model_dir(onnx_dir).meta.source.sha256 == weights:
            return onnx_dir
    except SdtrtError:
        pass
    announce()
    export_model(model_dir, onnx_dir, force=True, show_progress=False, log=lambda *_: None, **export_options)
    return onnx_dir
