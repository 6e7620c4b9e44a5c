"""TensorRT backend: serves engines built by `tensorrt` or `tensorrt_rtx` (the manifest says which).

Before any engine is deserialized it checks, from engines.json: the library version (engines only
load in the version that built them), every engine file's sha256, that a GPU exists, and that its
compute capability is one the engines target. Each call sets input shapes and tensor addresses on
torch CUDA tensors and runs execute_async_v3 on torch's current stream. The engines share one
device-memory block (they run one at a time), so calls are serialized by a lock and ordered across
streams by an event: two concurrent calls would otherwise overwrite each other's activations.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Mapping

import torch

from ...artifacts import ModelDir
from ...errors import SdtrtError
from ...files import file_sha256
from .base import TORCH_DTYPES
from .profile_check import check_profile


def _rebuild(model: ModelDir) -> str:
    return model.manifest.rebuild_command(model.root)


def preflight(model: ModelDir, verify: bool = True):
    """Every check that needs no GPU, in the order a user can act on them. Returns the toolkit."""
    from ...engines.toolkit import load_toolkit

    m = model.manifest
    tk = load_toolkit(m.backend.name)  # names the pip extra if the library is missing
    built, installed = m.backend.version, tk.version
    if built != installed:
        raise SdtrtError(
            f"the engines in {model.root} were built with {tk.display} {built}, but {installed} is installed; "
            "an engine only loads in the exact version that built it.",
            f"rebuild them: {_rebuild(model)}   (or install the version that built them: pip install {tk.name}=={built})")
    if verify:
        for name, entry in m.engines.items():
            path = model.root / entry.path
            if not path.is_file() or file_sha256(path) != entry.sha256:
                raise SdtrtError(f"{path} does not match engines.json (missing, changed or damaged since it was built).",
                                 f"rebuild: {_rebuild(model)}")
    return tk


def _check_gpu(model: ModelDir, device: torch.device) -> None:

    if not torch.cuda.is_available():
        raise SdtrtError("running TensorRT engines needs an NVIDIA GPU, and none is visible here.",
                         f"run the ONNX directory instead: Pipeline.load({model.manifest.onnx_dir!r}, backend='onnxruntime'), or use a GPU machine")
    major, minor = torch.cuda.get_device_capability(device)
    here = f"sm{major}{minor}"
    m = model.manifest
    targets = m.targets
    if here not in targets:
        raise SdtrtError(f"the engines in {model.root} were built for {', '.join(targets)}; this GPU is {here}.",
                         f"rebuild for it: {_rebuild(model)} --target {here}" if m.backend.name == "tensorrt-rtx"
                         else f"rebuild on this machine: {_rebuild(model)}")


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, model: ModelDir, device: str | torch.device | None = None, cuda_graphs: bool = False,
                 verify: bool = True, runtime_cache: str | Path | None = None, components: set[str] | None = None):
        self.model = model
        self.tk = preflight(model, verify)
        self.device = torch.device(device or "cuda")
        _check_gpu(model, self.device)
        trt = self.tk.trt
        self.logger = self.tk.logger()
        self._runtime = trt.Runtime(self.logger)
        self._manifest = model.manifest.engines
        self._specs = model.specs
        wanted = components or set(self._manifest)
        self._engines = {}
        for name in sorted(wanted & set(self._manifest)):
            data = (model.root / self._manifest[name].path).read_bytes()
            engine = self._runtime.deserialize_cuda_engine(data)
            if engine is None:
                raise SdtrtError(f"{self.tk.display} could not load {name}: " + "; ".join(self.logger.errors or ["no message"]),
                                 f"rebuild: {_rebuild(model)}")
            self._engines[name] = engine
        self._runtime_cache_path = Path(runtime_cache) if runtime_cache else None
        self._runtime_cache = None
        self._contexts = {name: self._context(engine, cuda_graphs) for name, engine in self._engines.items()}
        # one activation block for all engines: they never run at the same time (see the lock)
        size = max(e.device_memory_size_v2 for e in self._engines.values())
        self._memory = torch.empty(size + 256, dtype=torch.uint8, device=self.device)
        base = (self._memory.data_ptr() + 255) // 256 * 256  # TensorRT wants 256-byte alignment
        for ctx in self._contexts.values():
            ctx.set_device_memory(base, size)
        self._lock = threading.Lock()
        self._done = torch.cuda.Event()
        self._done.record(torch.cuda.current_stream(self.device))
        self._graphs = _Graphs(self) if cuda_graphs and not self.tk.is_rtx else None
        self._refitted: dict[str, set[str]] = {}  # component -> weight names replaced by set_weights

    def _context(self, engine, cuda_graphs: bool):
        trt = self.tk.trt
        if not self.tk.is_rtx:
            return engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        config = engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if cuda_graphs:  # TensorRT-RTX captures and replays CUDA graphs itself
            config.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        if self._runtime_cache_path is not None:  # JIT-compiled kernels kept across processes
            if self._runtime_cache is None:
                self._runtime_cache = config.create_runtime_cache()
                if self._runtime_cache_path.is_file():
                    self._runtime_cache.deserialize(self._runtime_cache_path.read_bytes())
            config.set_runtime_cache(self._runtime_cache)
        return engine.create_execution_context(config)

    # --- the Backend protocol -------------------------------------------------------------------

    def components(self) -> set[str]:
        return set(self._engines)

    def input_dtype(self, component: str, tensor: str) -> torch.dtype:
        return self._dtype(component, tensor)

    def _dtype(self, component: str, tensor: str) -> torch.dtype:
        return TORCH_DTYPES[self._specs[component].tensor(tensor).concrete_dtype(self._manifest[component].dtype)]

    def check_shapes(self, component: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
        check_profile(self._specs[component], self._manifest[component].profile, shapes, _rebuild(self.model))

    def run(self, component: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_shapes(component, {k: tuple(v.shape) for k, v in feeds.items()})
        if self._graphs is not None:
            return self._graphs.run(component, feeds)
        with self._lock:
            return self._enqueue(component, feeds)

    def _enqueue(self, component: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One engine call on torch's current stream, ordered after the previous call (shared activations)."""
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(self._done)  # the previous call's activations are done with
        outputs = self._execute(component, feeds, None, stream)
        self._done.record(stream)
        return outputs

    def _execute(self, component: str, feeds: Mapping[str, torch.Tensor], outputs: dict | None, stream) -> dict[str, torch.Tensor]:
        """Set shapes and addresses and enqueue; no cross-call ordering (so it can be graph-captured)."""
        ctx = self._contexts[component]
        for name, x in feeds.items():
            ctx.set_input_shape(name, tuple(x.shape))
            ctx.set_tensor_address(name, x.data_ptr())
        if outputs is None:
            outputs = {}
            for name in self._specs[component].output_names:
                outputs[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self._dtype(component, name), device=self.device)
        for name, out in outputs.items():
            ctx.set_tensor_address(name, out.data_ptr())
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise SdtrtError(f"{component} failed to run: " + "; ".join(self.logger.errors[-3:] or ["no message"]), f"rebuild: {_rebuild(self.model)}")
        return outputs

    def set_weights(self, component: str, weights: Mapping[str, torch.Tensor]) -> None:
        """Refit the engine's weights by name (engines built with --refit). Every name set earlier must be
        given again (with its original value to restore it): an engine, unlike a session, keeps what it
        was refitted with. `sdtrt.runtime.adapters` always passes the full set."""
        if not self.model.manifest.flags.get("refit"):
            raise SdtrtError(f"the engines in {self.model.root} were built without --refit, so their weights cannot change "
                             "(LoRA switching and Textual Inversion refit them).", f"rebuild refittable engines: {_rebuild(self.model)} --refit")
        dropped = self._refitted.get(component, set()) - set(weights)
        if dropped:
            raise SdtrtError(f"{component}: {sorted(dropped)[0]} was refitted before and is not given again.",
                             "pass every earlier weight with its original value (sdtrt.runtime.adapters does)")
        trt = self.tk.trt
        refitter = trt.Refitter(self._engines[component], self.logger)
        refitter.weights_validation = True  # refuse NaN/inf and shape mismatches instead of running on them
        arrays = [(name, t.detach().to("cpu").contiguous().numpy()) for name, t in weights.items()]
        for name, array in arrays:
            if not refitter.set_named_weights(name, trt.Weights(array)):
                raise SdtrtError(f"{component} has no refittable weight {name}.", f"rebuild with --refit: {_rebuild(self.model)} --refit")
        with self._lock:  # no engine call may run while its weights change
            torch.cuda.current_stream(self.device).synchronize()
            ok = refitter.refit_cuda_engine()
        if not ok:
            missing = refitter.get_missing_weights()
            raise SdtrtError(f"refitting {component} failed" + (f" (missing {', '.join(list(missing)[:3])})" if missing else "") + ": "
                             + "; ".join(self.logger.errors[-3:] or ["no message"]), f"rebuild: {_rebuild(self.model)} --refit")
        self._refitted[component] = set(weights)

    def close(self) -> None:
        """Save the TensorRT-RTX runtime cache (if one was asked for)."""
        if self._runtime_cache is not None and self._runtime_cache_path is not None:
            data = bytes(self._runtime_cache.serialize())
            fd, tmp = tempfile.mkstemp(dir=self._runtime_cache_path.parent, prefix=".runtime-cache.")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._runtime_cache_path)


class _Graphs:
    """CUDA graphs for TensorRT engines: one captured graph per component, re-captured when shapes
    change (a denoising loop keeps them fixed). Inputs are copied into static buffers and outputs
    cloned out, so callers still own what they get back."""

    def __init__(self, backend: TensorRTBackend):
        self.backend = backend
        self.graphs: dict[str, tuple[Any, dict, dict, dict]] = {}
        self.stream = torch.cuda.Stream(backend.device)

    def run(self, component: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        b = self.backend
        shapes = {k: tuple(v.shape) for k, v in feeds.items()}
        with b._lock:
            entry = self.graphs.get(component)
            if entry is None or entry[3] != shapes:
                static_in = {k: v.clone() for k, v in feeds.items()}
                static_out = b._enqueue(component, static_in)  # warm-up run, also allocates the outputs
                torch.cuda.synchronize(b.device)
                graph = torch.cuda.CUDAGraph()
                # events stay outside the capture: ordering between calls is done around replay()
                with torch.cuda.graph(graph, stream=self.stream):
                    b._execute(component, static_in, static_out, torch.cuda.current_stream(b.device))
                entry = self.graphs[component] = (graph, static_in, static_out, shapes)
            graph, static_in, static_out, _ = entry
            stream = torch.cuda.current_stream(b.device)
            for k, v in feeds.items():
                static_in[k].copy_(v)
            stream.wait_event(b._done)
            graph.replay()
            b._done.record(stream)
            return {k: v.clone() for k, v in static_out.items()}
