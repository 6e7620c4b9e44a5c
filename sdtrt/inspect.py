"""`sdtrt inspect`: what an ONNX or engine directory holds, from its metadata (no GPU needed)."""

from __future__ import annotations

import json
from pathlib import Path

from .runtime.artifacts import open_model_dir


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _shape(values) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def describe(path: Path, layers: bool = False) -> str:
    model = open_model_dir(path)
    meta = model.meta
    lines = [f"{model.root}: {'engine' if model.kind == 'engines' else 'ONNX'} directory",
             f"model: {meta['pipeline_class']} ({meta['family']}), text dim {meta['text_embedding_dim']}, "
             f"UNet in-channels {meta['unet_in_channels']}, native size {meta['default_size'][0]}x{meta['default_size'][1]}, "
             f"prediction {meta['prediction_type']}, scheduler {meta['scheduler_config'].get('_class_name')}",
             f"source weights sha256 {meta['source']['sha256'][:16]}..., exported by sdtrt {meta['sdtrt_version']} (opset {meta['opset']})"]
    if model.kind == "onnx":
        lines.append(f"{'component':<14}{'dtype':<7}{'external':<10}inputs")
        for name, c in meta["components"].items():
            ins = ", ".join(f"{k} {v['dtype']} {_shape(v['dims'])}" for k, v in c["inputs"].items())
            lines.append(f"{name:<14}{c['dtype']:<7}{'yes' if c['external_data'] else 'no':<10}{ins}")
        return "\n".join(lines)
    m = model.manifest
    flags = m["flags"]
    gpu = m.get("build_machine_gpu") or "no GPU (ahead of time)"
    lines += [
        f"built with {m['backend']['name']} {m['backend']['version']} by sdtrt {m['sdtrt_version']} at {m['built_at']} on {gpu}, "
        f"{m['build_seconds']}s, peak RSS {m.get('peak_rss_mb')} MB",
        f"targets: {', '.join(m['targets'])}",
        f"flags: batch {flags['batch']}, height {flags['height']}, width {flags['width']}, opt-level {flags['opt_level']}, "
        f"refit {'yes' if flags['refit'] else 'no'}, TF32 {'yes' if flags['tf32'] else 'no'}, workspace {flags['workspace_mb'] or 'default'}",
        f"{'engine':<14}{'dtype':<7}{'size':>10}{'build':>8}{'layers':>8}  inputs: min / opt / max",
    ]
    for name, e in m["engines"].items():
        ins = "; ".join(f"{k} {v['dtype']} {_shape(v['min'])} / {_shape(v['opt'])} / {_shape(v['max'])}" for k, v in e["inputs"].items())
        build = "cached" if e.get("cache_hit") else f"{e['build_seconds']}s"
        lines.append(f"{name:<14}{e['dtype']:<7}{_mb(e['size_bytes']):>10}{build:>8}{sum(e['layers'].values()):>8}  {ins}")
    if layers:
        for name, e in m["engines"].items():
            top = sorted(e["layers"].items(), key=lambda kv: -kv[1])
            lines.append(f"{name} network layers (before fusion): " + ", ".join(f"{k} {v}" for k, v in top))
        lines.append(_engine_layers(model))
    return "\n".join(lines)


def _engine_layers(model) -> str:
    """Per-layer engine information needs the engine deserialized, which needs a GPU."""
    try:
        from .runtime.backends.tensorrt import TensorRTBackend

        backend = TensorRTBackend(model)
    except Exception as e:  # noqa: BLE001 - explain why the detailed view is unavailable
        return f"(fused engine layers not shown: {str(e).splitlines()[0]})"
    out = []
    for name, engine in backend._engines.items():
        info = json.loads(engine.create_engine_inspector().get_engine_information(backend.tk.trt.LayerInformationFormat.JSON))
        out.append(f"{name}: {len(info.get('Layers', []))} engine layers after fusion")
    return "\n".join(out)
