"""`sdtrt build`: an ONNX directory in, an engine directory (engines + engines.json) out."""

from __future__ import annotations

import datetime
import hashlib
import json
import resource
import shutil
import time
from pathlib import Path
from typing import Iterable

from .. import __version__
from ..files import (atomic_dir, atomic_file, cache_dir, check_can_write, check_not_inside, check_output_dir, file_sha256,
                     write_text)
from ..errors import SdtrtError
from ..progress import progress
from ..artifacts import EngineFile, EngineManifest, Library, open_model_dir
from .builder import BuildOptions, build_engine
from .profiles import Ranges, profile
from .toolkit import load_toolkit, local_gpu_target, resolve_targets


MAX_WORKSPACE_MB = 1 << 20  # 1 TiB: more than any GPU has; larger values overflow TensorRT's byte count


def engine_cache_dir(override: Path | None = None) -> Path:
    return Path(override) if override else cache_dir(instead="--cache-dir DIR or --no-cache") / "engines"


def build_engines(
    onnx_dir: Path,
    out: Path,
    backend: str = "tensorrt-rtx",
    batch: str = "1:1:4",
    height: str | None = None,
    width: str | None = None,
    target: str | None = None,
    opt_level: int = 3,
    timing_cache: Path | None = None,
    refit: bool = False,
    workspace_mb: int | None = None,
    components: Iterable[str] | None = None,
    max_prompt_chunks: int = 1,
    force: bool = False,
    use_cache: bool = True,
    cache: Path | None = None,
    show_progress: bool = True,
    log=print,
) -> Path:
    """Build one engine per component into `out` (all or nothing); returns `out`."""
    tk = load_toolkit(backend)
    model = open_model_dir(onnx_dir)
    if model.kind != "onnx":
        raise SdtrtError(f"{onnx_dir} is already an engine directory.", "pass the ONNX directory written by `sdtrt export`")
    check_not_inside(out, onnx_dir, "ONNX directory")
    available = list(model.meta.components)
    components = list(components) if components is not None else None
    if components is not None and not components:
        raise SdtrtError("--components names no component.", f"pass --components with some of {','.join(available)}, or drop it for all")
    names = list(dict.fromkeys(components)) if components else available
    missing = [c for c in names if c not in available]
    if missing:
        raise SdtrtError(f"{onnx_dir} has no {', '.join(missing)} ONNX.",
                         f"re-export with --components {','.join(available + missing)}, or drop {', '.join(missing)} from --components")
    native = model.meta.default_size
    ranges = Ranges.parse(batch, height or str(native[0]), width or str(native[1]), max_prompt_chunks)
    if not 0 <= opt_level <= 5:
        raise SdtrtError(f"--opt-level {opt_level} is outside 0-5.", "pass --opt-level 3 (the default) or another value 0-5")
    if workspace_mb is not None and not 1 <= workspace_mb <= MAX_WORKSPACE_MB:
        raise SdtrtError(f"--workspace {workspace_mb} is outside 1-{MAX_WORKSPACE_MB} MiB.",
                         "pass --workspace with the MiB the builder may use (e.g. 4096), or drop it")
    if timing_cache is not None and tk.is_rtx:
        raise SdtrtError("TensorRT-RTX has no timing cache: since RTX 1.2 the API is a no-op, and calling it makes the "
                         "builder query a GPU, which breaks ahead-of-time builds on machines without one.",
                         "drop --timing-cache for --backend tensorrt-rtx (its runtime cache, Pipeline.load(..., runtime_cache=PATH), "
                         "plays that role when engines run)")
    targets = resolve_targets(tk, target)
    options = BuildOptions(tuple(targets), opt_level, refit, workspace_mb, True, Path(timing_cache) if timing_cache else None)
    out = Path(out)
    check_output_dir(out, force)
    store = engine_cache_dir(cache) if use_cache else None
    if store is not None:
        check_can_write(store / "engine", "--cache-dir")
    started = time.time()
    entries: dict[str, EngineFile] = {}
    with atomic_dir(out, force) as tmp:
        for name in names:
            entries[name] = _engine(tk, model, name, ranges, options, tmp, store, show_progress, log)
        for folder in [t.dir for t in model.meta.tokenizers.values()] + ["scheduler"]:
            shutil.copytree(model.root / folder, tmp / folder)
        model.meta.write(tmp)
        EngineManifest(
            backend=Library(tk.name, tk.module_name, tk.version), targets=targets,
            flags={"batch": str(ranges.batch), "height": str(ranges.height), "width": str(ranges.width),
                   "max_prompt_chunks": ranges.prompt_chunks, **options.key_fields(),
                   "timing_cache": str(options.timing_cache) if options.timing_cache else None},
            engines=entries, onnx_dir=str(model.root.absolute()), weights_sha256=model.meta.source.sha256,
            sdtrt_version=__version__, build_machine_gpu=local_gpu_target(),
            built_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            build_seconds=round(time.time() - started, 2),
            peak_rss_mb=round(max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024, 1),
        ).write(tmp)  # last: its presence means complete
    return out


def cache_key(onnx_sha256: str, shapes: dict, options: dict, module: str, version: str) -> str:
    """Same ONNX + profile + build options + library version + targets -> same key -> no rebuild."""
    payload = json.dumps({"onnx": onnx_sha256, "shapes": shapes, "options": options, "module": module, "version": version},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _engine(tk, model, name: str, ranges: Ranges, options: BuildOptions, tmp: Path, store: Path | None, show_progress: bool,
            log) -> EngineFile:
    info = model.meta.components[name]
    onnx_path = model.root / info.path
    onnx_sha = file_sha256(onnx_path)
    if onnx_sha != info.sha256:
        raise SdtrtError(f"{onnx_path} changed after export (its sha256 no longer matches sdtrt.json).",
                         f"re-export the model: sdtrt export {model.meta.source.path} --out {model.root} --force")
    shapes = profile(model.specs[name], ranges)
    key = cache_key(onnx_sha, {k: [list(s) for s in v] for k, v in shapes.items()}, options.key_fields(), tk.module_name, tk.version)
    target = tmp / f"{name}.engine"
    cached = _from_cache(store, key, target)
    if cached is not None:
        log(f"{name}: engine cache hit ({key[:12]}), not rebuilt")
        build = cached
    else:
        bar = progress(desc=f"build {name}", disable=not show_progress, unit="step")
        try:
            built = build_engine(tk.name, onnx_path, shapes, options, target, bar)
        finally:
            bar.close()
        build = {"build_seconds": round(built.seconds, 2), "layers": built.layers, "cache_hit": False,
                 "no_gpu_messages_suppressed": built.suppressed_messages}
        if store is not None:
            _to_cache(store, key, target, build)
        log(f"{name}: built in {built.seconds:.1f}s ({sum(built.layers.values())} layers)")
    return EngineFile(path=target.name, dtype=info.dtype, sha256=file_sha256(target), size_bytes=target.stat().st_size,
                      onnx_sha256=onnx_sha, cache_key=key, profile={k: [list(s) for s in v] for k, v in shapes.items()}, **build)


def _from_cache(store: Path | None, key: str, target: Path) -> dict | None:
    if store is None:
        return None
    engine, meta = store / f"{key}.engine", store / f"{key}.json"
    if not (engine.is_file() and meta.is_file()):
        return None
    try:
        record = json.loads(meta.read_text())
        build = dict(record["build"], cache_hit=True)
        fresh = file_sha256(engine) == record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged cache entry is rebuilt, never trusted
    if not fresh:
        return None
    shutil.copyfile(engine, target)
    return build


def _to_cache(store: Path, key: str, engine: Path, build: dict) -> None:
    with atomic_file(store / f"{key}.engine") as tmp:
        shutil.copyfile(engine, tmp)
    write_text(store / f"{key}.json", json.dumps({"sha256": file_sha256(engine), "build": build}))
