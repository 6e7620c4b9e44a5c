"""Build one serialized engine from one ONNX file, with either TensorRT library, in a worker process.

Why a process: TensorRT calls back into Python (logger, progress monitor) and swallows any exception
raised there, so a Ctrl-C during `build_serialized_network` used to be printed and ignored while the
build ran to the end. The worker ignores SIGINT and dies with its parent; the parent waits on the
worker's progress messages, and on Ctrl-C/SIGTERM kills it at once. It also keeps a build's memory
out of the CLI process.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import SdtrtError
from ..files import write_bytes
from .toolkit import load_toolkit


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    targets: tuple[str, ...]
    opt_level: int = 3
    refit: bool = False
    workspace_mb: int | None = None
    tf32: bool = True  # fp32 parts of the network may use TF32 tensor cores
    timing_cache: Path | None = None

    def key_fields(self) -> dict:
        """What changes the engine (and so the cache key); the timing cache only changes build time."""
        return {"targets": list(self.targets), "opt_level": self.opt_level, "refit": self.refit,
                "workspace_mb": self.workspace_mb, "tf32": self.tf32}


@dataclasses.dataclass
class Built:
    seconds: float
    layers: dict[str, int]  # layer type -> count, from the parsed network (known without a GPU)
    suppressed_messages: int
    warnings: list[str]


# --- parent side ---------------------------------------------------------------------------------


def build_engine(library: str, onnx_path: Path, shapes: dict[str, tuple], options: BuildOptions, out: Path,
                 bar=None) -> Built:
    """Build `onnx_path` into the engine file `out` in a worker process; raises SdtrtError with
    TensorRT's own errors on failure. `bar` (tqdm) shows the build's phases and their fraction."""
    job = {"library": library, "onnx": str(onnx_path), "out": str(out),
           "shapes": {k: [list(s) for s in v] for k, v in shapes.items()},
           "options": {**dataclasses.asdict(options), "timing_cache": str(options.timing_cache) if options.timing_cache else None}}
    proc = subprocess.Popen([sys.executable, "-m", "sdtrt.engines.builder"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, bufsize=1)
    try:
        proc.stdin.write(json.dumps(job))
        proc.stdin.close()
        result = None
        for line in proc.stdout:
            msg = json.loads(line)
            if "error" in msg:
                raise SdtrtError(msg["error"]["problem"], msg["error"]["fix"])
            if "result" in msg:
                result = msg["result"]
                if bar is not None and bar.total:
                    bar.update(bar.total - bar.n)
            elif bar is not None:
                _show(bar, msg)
        code = proc.wait()
    except BaseException:  # Ctrl-C, SIGTERM, or an error: the build must not go on without us
        proc.kill()
        proc.wait()
        Path(out).unlink(missing_ok=True)
        raise
    if result is None or code != 0:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        raise SdtrtError(f"the engine build for {onnx_path} {how} without a result"
                         + (" (signal 9 is usually the kernel's out-of-memory killer)" if code == -9 else "") + ".",
                         "narrow --batch/--height/--width, close other jobs, or build on a machine with more memory")
    return Built(result["seconds"], result["layers"], result["suppressed"], result["warnings"])


def _show(bar, msg: dict) -> None:
    if "phase" in msg:
        bar.set_postfix_str(msg["phase"], refresh=False)
        if msg.get("root_steps"):
            bar.reset(total=msg["root_steps"])
    elif "root_step" in msg:
        bar.update(1)


# --- worker side ---------------------------------------------------------------------------------


def build_here(job: dict[str, Any], emit: Callable[[dict], None]) -> dict:
    """Parse, configure and build (in the worker). Returns what `Built` holds; raises SdtrtError."""
    tk = load_toolkit(job["library"])
    trt = tk.trt
    options = BuildOptions(**{**job["options"], "targets": tuple(job["options"]["targets"]),
                              "timing_cache": Path(job["options"]["timing_cache"]) if job["options"]["timing_cache"] else None})
    onnx_path = Path(job["onnx"])
    logger = tk.logger()
    builder = trt.Builder(logger)
    # Strongly typed: each layer's precision comes from the ONNX (fp16 ONNX -> fp16 engine).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # by path: external data files are found beside it
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] + logger.errors
        raise SdtrtError(f"{tk.display} could not parse {onnx_path}:\n  " + "\n  ".join(errors or ["(no message)"]),
                         "re-export the ONNX with `sdtrt export` (and a supported --opset), or report the parser error above")
    layers = collections.Counter(str(network.get_layer(i).type).split(".")[-1] for i in range(network.num_layers))
    config = builder.create_builder_config()
    tk.set_targets(config, list(options.targets))
    config.builder_optimization_level = options.opt_level
    if options.tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.set_flag(trt.BuilderFlag.TF32)
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in job["shapes"].items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = None
    if options.timing_cache is not None:  # TensorRT only; the CLI refuses it for TensorRT-RTX
        blob = options.timing_cache.read_bytes() if options.timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)
    config.progress_monitor = _monitor(trt, emit)
    started = time.time()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.time() - started
    if serialized is None:
        errors = logger.errors or ["(no message)"]
        if any("workspace" in e.lower() for e in errors):
            fix = "raise --workspace (or drop it: TensorRT may then use all device memory)"
        elif any("memory" in e.lower() for e in errors):
            fix = "narrow --batch/--height/--width, close other jobs, or build on a machine with more memory"
        else:
            fix = "see TensorRT's errors above; re-export with `sdtrt export` if the graph is at fault"
        raise SdtrtError(f"{tk.display} failed to build an engine from {onnx_path}:\n  " + "\n  ".join(errors), fix)
    write_bytes(Path(job["out"]), memoryview(serialized))
    if cache is not None:
        write_bytes(options.timing_cache, bytes(config.get_timing_cache().serialize()))
    return {"seconds": seconds, "layers": dict(layers), "suppressed": logger.suppressed, "warnings": logger.warnings}


def _monitor(trt, emit: Callable[[dict], None]):
    """TensorRT's IProgressMonitor -> messages: the phase path, and the top phase's steps as a fraction."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.root = None

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                self.root = phase_name
                emit({"phase": phase_name, "root_steps": num_steps})
            else:
                emit({"phase": f"{parent_phase} / {phase_name}"})

        def step_complete(self, phase_name, step):
            if phase_name == self.root:
                emit({"root_step": step})
            return True

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker if the CLI process dies (even by SIGKILL)."""
    import ctypes
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides; TensorRT would swallow it anyway
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker() -> int:
    _die_with_parent()
    out = sys.stdout

    def emit(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    sys.stdout = sys.stderr  # anything a library prints must not corrupt the message stream
    try:
        emit({"result": build_here(json.loads(sys.stdin.read()), emit)})
    except SdtrtError as e:
        emit({"error": {"problem": e.problem, "fix": e.fix}})
    except Exception as e:  # noqa: BLE001 - TensorRT's bindings raise their own types; the parent reports one line, not a traceback
        first = (str(e).strip().splitlines() or [""])[0][:300]
        emit({"error": {"problem": f"the engine build failed: {type(e).__name__}: {first}",
                        "fix": "narrow --batch/--height/--width, or re-export with `sdtrt export`; report the error if it persists"}})
    return 0


if __name__ == "__main__":
    sys.exit(_worker())
