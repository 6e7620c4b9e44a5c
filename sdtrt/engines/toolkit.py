"""One adapter over `tensorrt` and `tensorrt_rtx`, whose Python APIs are nearly the same.

Everything that differs between them lives here: module and pip extra names, how targets are
chosen (TensorRT builds for the GPU it runs on; TensorRT-RTX builds ahead of time for listed
compute capabilities, on a machine with or without a GPU), and which builder features exist.
"""

from __future__ import annotations

import dataclasses
import re
from types import ModuleType

from ..errors import SdtrtError, require

LIBRARIES = {"tensorrt": ("tensorrt", "tensorrt", "TensorRT"), "tensorrt-rtx": ("tensorrt_rtx", "tensorrt-rtx", "TensorRT-RTX")}
RTX_TARGETS = ("sm75", "sm80", "sm86", "sm89", "sm120", "sm121")
# Messages TensorRT-RTX logs when it probes for a GPU on a machine without one; the build is unaffected.
_NO_GPU_NOISE = re.compile(r"cudaError 35|CUDA driver version is insufficient|ScopedCudaStream|catchCudaError|no CUDA-capable device", re.I)


@dataclasses.dataclass
class Toolkit:
    name: str  # "tensorrt" or "tensorrt-rtx" (CLI / manifest name)
    trt: ModuleType

    @property
    def module_name(self) -> str:
        return LIBRARIES[self.name][0]

    @property
    def display(self) -> str:
        return LIBRARIES[self.name][2]

    @property
    def version(self) -> str:
        return str(self.trt.__version__)

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt-rtx"

    def logger(self, echo_warnings: bool = False):
        """A trt.ILogger that collects errors and warnings (and counts harmless no-GPU messages)."""
        return make_logger(self.trt, echo_warnings)

    def set_targets(self, config, targets: list[str]) -> None:
        """TensorRT-RTX: build for these compute capabilities. TensorRT: the local GPU only."""
        if not self.is_rtx:
            return
        config.num_compute_capabilities = len(targets)
        for i, t in enumerate(targets):
            if not config.set_compute_capability(getattr(self.trt.ComputeCapability, t.upper()), i):
                raise SdtrtError(f"{self.display} refused target {t}.", f"choose from {', '.join(RTX_TARGETS)}")


def load_toolkit(name: str) -> Toolkit:
    if name not in LIBRARIES:
        raise SdtrtError(f"unknown engine backend {name!r}.", f"choose one of: {', '.join(LIBRARIES)}")
    module, extra, display = LIBRARIES[name]
    return Toolkit(name, require(module, extra, f"building or running {display} engines"))


def local_gpu_target() -> str | None:
    """'sm86' style name of the local GPU, or None without one."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"sm{major}{minor}"
    except Exception:  # noqa: BLE001 - a broken CUDA install means "no usable GPU" here
        pass
    return None


def resolve_targets(toolkit: Toolkit, requested: str | None) -> list[str]:
    """Targets to build for, from --target (comma-separated) or the local GPU; errors name the fix."""
    local = local_gpu_target()
    if not toolkit.is_rtx:
        if local is None:
            raise SdtrtError("TensorRT builds engines for the GPU it runs on, and this machine has none.",
                             "build on the target GPU machine, or use --backend tensorrt-rtx --target sm86,sm89 (ahead-of-time, no GPU needed)")
        if requested and [t.strip().lower() for t in requested.split(",")] != [local]:
            raise SdtrtError(f"TensorRT can only build for this machine's GPU ({local}), not {requested}.",
                             f"drop --target (or pass --target {local}); cross-target builds need --backend tensorrt-rtx")
        return [local]
    if not requested:
        if local is None:
            raise SdtrtError("no GPU on this machine to pick a target from.",
                             f"pass --target with the GPUs to build for, e.g. --target sm86,sm89 (TensorRT-RTX builds {', '.join(RTX_TARGETS)})")
        requested = local
    targets = [t.strip().lower() for t in requested.split(",") if t.strip()]
    if not targets:
        raise SdtrtError(f"--target {requested!r} names no GPU.",
                         f"pass --target with some of {', '.join(RTX_TARGETS)}, e.g. --target sm86,sm89")
    for t in targets:
        if t not in RTX_TARGETS:
            hint = (" (Hopper: H100/H200): TensorRT-RTX does not target data-center GPUs; use --backend tensorrt on that machine"
                    if t == "sm90" else "")
            raise SdtrtError(f"TensorRT-RTX cannot build for {t}{hint}.", f"pass --target with some of {', '.join(RTX_TARGETS)}")
    return list(dict.fromkeys(targets))


def make_logger(trt: ModuleType, echo_warnings: bool = False):
    """The ILogger subclass must derive from the loaded module's class, so it is made per module."""
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []
            self.suppressed = 0

        def log(self, severity, msg):  # called from TensorRT threads; list.append is atomic
            if _NO_GPU_NOISE.search(msg):
                self.suppressed += 1
            elif severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.WARNING:
                self.warnings.append(msg)
                if echo_warnings:
                    import sys

                    print(f"[{trt.__name__}] {msg}", file=sys.stderr)

    return _Logger()
