"""ONNX Runtime's optimized graphs, kept per machine so that a restarted process skips graph optimization.

Creating a session for a large UNet spends most of its time optimizing the graph (fusions, constant
folding, the CPU's NCHWc layout), and does it again on every start. ONNX Runtime can write the graph it
ends with; loaded with optimizations off, that file gives the same session, sooner. At the 'all' level the
result is specific to the CPU's instruction set (ONNX Runtime says so), so it lives in the user's cache
folder, keyed by everything it depends on, never next to the portable export:

  the component's recorded hash, the ONNX file's and its data file's size and mtime (a file edited in
  place after export misses), onnxruntime's version, the optimization level, the provider, the session
  config entries, and the CPU's feature flags.

Used only for a component's own weights: a session with replaced initializers (LoRA, Textual Inversion)
is optimized from the export, since fusion renames the initializers it would replace. An entry is
written the first time a component loads (the session writes the graph it optimized anyway); writing a
new entry for an export removes that export's older ones. $SDTRT_ORT_CACHE=0 turns the cache off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ...errors import SdtrtError

log = logging.getLogger("sdtrt")

FOLDER = "ort-optimized"
MODEL = "model.onnx"
DATA = "model.onnx.data"
SOURCE = "source.json"  # the export file an entry was made from, for pruning


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def key(onnx_path: Path, recorded_sha256: str, level: str, provider: str, config: dict[str, str] | None = None) -> str:
    import onnxruntime as ort

    files = [onnx_path, *(p for p in [onnx_path.with_name(onnx_path.name + ".data")] if p.exists())]
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    facts = {"sha256": recorded_sha256, "files": stats, "onnxruntime": ort.__version__, "level": level,
             "provider": provider, "session_config": config or {}, "machine": platform.machine(), "cpu": hashlib.sha256(_cpu_flags().encode()).hexdigest()}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def root() -> Path | None:
    """The cache folder, or None (caching off) when $SDTRT_ORT_CACHE=0 or the cache folder is unusable:
    the cache only saves time, so a read-only home never stops a load."""
    if os.environ.get("SDTRT_ORT_CACHE", "1").lower() in ("0", "false", "no", "off"):
        return None
    from ...files import cache_dir

    try:
        return cache_dir() / FOLDER
    except SdtrtError as e:
        if not _warned:
            _warned.append(True)
            log.warning("not caching ONNX Runtime's optimized graphs (%s); loads take longer", e.problem)
        return None


_warned: list[bool] = []  # say it once per process, not once per component


def cached(cache_key: str) -> Path | None:
    base = root()
    path = base / cache_key / MODEL if base is not None else None
    return path if path is not None and path.is_file() else None


def save_options(opts: Any, tmp: Path) -> None:
    """Ask a session being created to write its optimized graph (weights in one external data file) into tmp."""
    opts.optimized_model_filepath = str(tmp / MODEL)
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", DATA)
    opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")


def writer(cache_key: str, source: Path):
    """A context manager yielding the temporary folder to write into, or None when caching is off. The
    entry appears only complete (two processes writing the same entry: one complete copy wins); then
    entries of the same source file made before it changed, and of source files since deleted, go."""
    base = root()
    if base is None:
        return None
    size = sum(p.stat().st_size for p in (source, source.with_name(source.name + ".data")) if p.exists())
    try:
        base.mkdir(exist_ok=True)
        free = shutil.disk_usage(base).free
    except OSError:
        return None
    if free < 2 * size + 2**30:  # an entry is about the export's size; never fill the disk for a speed-up
        log.warning("not caching ONNX Runtime's optimized graph of %s: %.1f GB free in %s, it needs about %.1f GB",
                    source, free / 1e9, base, size / 1e9)
        return None
    return _writing(base, cache_key, Path(source).absolute())


@contextlib.contextmanager
def _writing(base: Path, cache_key: str, source: Path) -> Iterator[Path | None]:
    """Yield a hidden temporary folder beside the entry, then rename it into place. An entry already
    there is kept (another process wrote the same graph; a reader may be loading it), so readers never
    see an entry move. Caching never fails a load: any file-system error here means no entry."""
    from ...files import PARTIAL, apply_umask, remove_abandoned

    remove_abandoned(base / cache_key)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache_key}.{os.getpid()}.", suffix=PARTIAL, dir=base))
    except OSError:
        yield None
        return
    try:
        yield tmp
        (tmp / SOURCE).write_text(json.dumps({"source": str(source)}))
        apply_umask(tmp)
        os.rename(tmp, base / cache_key)
    except OSError as e:
        if not (base / cache_key / MODEL).is_file():
            log.warning("could not cache ONNX Runtime's optimized graph of %s: %s", source, e)
        return
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for entry in base.iterdir():
        if entry.name == cache_key or not entry.is_dir():
            continue
        try:
            other = Path(json.loads((entry / SOURCE).read_text())["source"])
        except (OSError, ValueError, KeyError):
            continue  # being written, or not ours
        if other == source or not other.exists():
            shutil.rmtree(entry, ignore_errors=True)


def discard(cache_key: str) -> None:
    """Remove an entry that would not load (damaged), so the next writer can put a whole one in its place."""
    base = root()
    if base is None or not (base / cache_key).is_dir():
        return
    from ...files import PARTIAL

    aside = base / f".{cache_key}.{os.getpid()}.damaged{PARTIAL}"
    with contextlib.suppress(OSError):
        os.rename(base / cache_key, aside)
    shutil.rmtree(aside, ignore_errors=True)
