"""`sdtrt inspect`: what an ONNX or engine directory holds, and whether the files it lists are really
there (present, recorded size; with verify, the recorded sha256). Works without a GPU: everything
comes from sdtrt.json / engines.json."""

from __future__ import annotations

import json
from pathlib import Path

from .artifacts import ModelDir, open_model_dir
from .errors import SdtrtError
from .files import file_sha256


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _shape(values) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def problems(model: ModelDir, verify: bool = False) -> list[str]:
    """What is wrong with the files the directory lists (empty when healthy)."""
    found = []
    for name, f in model.files.items():
        path = model.root / f.path
        if not path.is_file():
            found.append(f"{name}: {path} is missing")
        elif path.stat().st_size != f.size_bytes:
            found.append(f"{name}: {path} is {path.stat().st_size} bytes, {f.size_bytes} were written")
        elif verify and file_sha256(path) != f.sha256:
            found.append(f"{name}: {path} does not match its recorded sha256 (changed or damaged)")
    return found


def check(path: Path, verify: bool = False) -> ModelDir:
    """Open the directory and refuse it, naming the fix, unless every listed file is healthy."""
    model = open_model_dir(path)
    found = problems(model, verify)
    if found:
        fix = (model.manifest.rebuild_command(model.root) if model.manifest
               else f"re-export: sdtrt export {model.meta.source.path} --out {model.root} --force")
        raise SdtrtError(f"{model.root} is damaged: " + "; ".join(found) + ".", fix)
    return model


def describe(path: Path, layers: bool = False, verify: bool = False) -> str:
    model = check(path, verify)
    meta = model.meta
    family = model.family
    specs = model.specs
    lines = [f"{model.root}: {'engine' if model.kind == 'engines' else 'ONNX'} directory, "
             f"files {'verified (sha256)' if verify else 'present (sizes checked; --verify also checks hashes)'}",
             f"model: {family.describe(meta.config)} ({meta.pipeline_class}), native size {meta.default_size[0]}x{meta.default_size[1]}, "
             f"prediction {meta.scheduler_config.get('prediction_type', 'epsilon')}, scheduler {meta.scheduler_config.get('_class_name')}",
             f"source weights sha256 {meta.source.sha256[:16]}..., exported by sdtrt {meta.sdtrt_version} (opset {meta.opset})"]
    nets = [n.removeprefix("controlnet_") for n in model.files if n.startswith("controlnet_")]
    if nets:
        lines.append(f"ControlNets: {', '.join(nets)} (the UNet takes their residuals)")
    if meta.adapters:
        lines.append("merged at export: " + ", ".join(f"{Path(a.path).name} x{a.scale}" for a in meta.adapters))
    if model.kind == "onnx":
        lines.append(f"{'component':<16}{'dtype':<7}{'size':>10}  {'external':<10}inputs")
        for name, f in meta.components.items():
            ins = ", ".join(f"{t.name} {t.concrete_dtype(f.dtype)} {_shape(t.dims)}" for t in specs[name].inputs)
            lines.append(f"{name:<16}{f.dtype:<7}{_mb(f.size_bytes):>10}  {'yes' if f.external_data else 'no':<10}{ins}")
        return "\n".join(lines)
    m = model.manifest
    flags = m.flags
    gpu = m.build_machine_gpu or "no GPU (ahead of time)"
    lines += [
        f"built with {m.backend.name} {m.backend.version} by sdtrt {m.sdtrt_version} at {m.built_at} on {gpu}, "
        f"{m.build_seconds}s, peak RSS {m.peak_rss_mb} MB",
        f"targets: {', '.join(m.targets)}",
        f"flags: batch {flags.get('batch')}, height {flags.get('height')}, width {flags.get('width')}, opt-level {flags.get('opt_level')}, "
        f"refit {'yes' if flags.get('refit') else 'no'}, TF32 {'yes' if flags.get('tf32') else 'no'}, workspace {flags.get('workspace_mb') or 'default'}",
        f"{'engine':<16}{'dtype':<7}{'size':>10}{'build':>8}{'layers':>8}  inputs: min / opt / max",
    ]
    for name, e in m.engines.items():
        ins = "; ".join(f"{k} {specs[name].tensor(k).concrete_dtype(e.dtype)} {_shape(lo)} / {_shape(opt)} / {_shape(hi)}"
                        for k, (lo, opt, hi) in e.profile.items())
        build = "cached" if e.cache_hit else f"{e.build_seconds}s"
        lines.append(f"{name:<16}{e.dtype:<7}{_mb(e.size_bytes):>10}{build:>8}{sum(e.layers.values()):>8}  {ins}")
    if layers:
        for name, e in m.engines.items():
            top = sorted(e.layers.items(), key=lambda kv: -kv[1])
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
