"""Build one serialized engine from one ONNX file, with either TensorRT library."""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path

from ..errors import SdtrtError
from .toolkit import Toolkit


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
    data: bytes
    seconds: float
    layers: dict[str, int]  # layer type -> count, from the parsed network (known without a GPU)
    suppressed_messages: int
    warnings: list[str]


class _Progress:
    """Adapts TensorRT's IProgressMonitor to a tqdm bar (phases as the bar's description)."""

    @staticmethod
    def make(trt, bar):
        class Monitor(trt.IProgressMonitor):
            def __init__(self):
                trt.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name, parent_phase, num_steps):
                if bar is not None:
                    bar.set_postfix_str(phase_name if parent_phase is None else f"{parent_phase} / {phase_name}")

            def step_complete(self, phase_name, step):
                return True  # never cancel

            def phase_finish(self, phase_name):
                pass

        return Monitor()


def build_engine(tk: Toolkit, onnx_path: Path, shapes: dict[str, tuple], options: BuildOptions, bar=None) -> Built:
    """Parse, configure and build. Raises SdtrtError carrying TensorRT's own errors on failure."""
    trt = tk.trt
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
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache = None
    if options.timing_cache is not None:  # TensorRT only; the CLI refuses it for TensorRT-RTX
        blob = options.timing_cache.read_bytes() if options.timing_cache.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, False)
    config.progress_monitor = _Progress.make(trt, bar)
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
    if cache is not None:
        _write_atomic(options.timing_cache, bytes(config.get_timing_cache().serialize()))
    return Built(bytes(serialized), seconds, dict(layers), logger.suppressed, logger.warnings)


def _write_atomic(path: Path, data: bytes) -> None:
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
