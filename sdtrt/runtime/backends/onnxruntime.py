"""ONNX Runtime backend: one InferenceSession per component, IO binding straight on torch tensors.

Inputs are bound at their data_ptr and outputs are written into torch tensors allocated per call,
so no tensor goes through numpy. InferenceSession.run is thread-safe and each call makes its own
binding and outputs, so one backend serves concurrent pipeline calls.

Start-up: by default the sessions of the family's default components (txt2img: text encoders, UNet,
VAE decoder) are created at load, in parallel; the rest (VAE encoder, ControlNets, ...) when a request
first needs them (`prepare`, called by the pipeline once a request has passed its checks, creates them
in parallel too). `preload="none"` defers every session to the first request, so that a request the
model refuses costs no session at all (the CLI does this). Each session's optimized graph is cached per
machine (ort_cache.py), so a restarted process skips the graph optimization.
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import torch

from ...artifacts import ModelDir
from ...errors import OutOfMemory, SdtrtError, require
from . import ort_cache
from .base import TORCH_DTYPES

PRELOAD = ("default", "none", "all")  # which sessions Backend() creates: the family's default components, none, every one
OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def _numpy_types() -> dict[torch.dtype, Any]:
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16, torch.int32: np.int32, torch.int64: np.int64}


_NP = _numpy_types()


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model: ModelDir, device: str | torch.device | None = None, threads: int = 0,
                 inter_op_threads: int = 0, graph_optimization_level: str = "all", providers: list | None = None,
                 components: set[str] | None = None, session_config: Mapping[str, str] | None = None,
                 optimized_cache: bool = True, preload: str = "default"):
        ort = require("onnxruntime", "onnxruntime", "the onnxruntime backend")
        self.model = model
        try:
            self.device = torch.device(device or "cpu")
        except (RuntimeError, ValueError):
            raise SdtrtError(f"{device!r} is not a device.", "pass device='cpu' or 'cuda[:N]'",
                             cli_fix="pass --device cpu or --device cuda[:N]") from None
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SdtrtError("device='cuda' needs onnxruntime's CUDA provider, which this onnxruntime lacks.",
                             "pip uninstall onnxruntime && pip install 'sdtrt[onnxruntime-gpu]' (or use device='cpu')",
                             cli_fix="pass --device cpu, or pip uninstall onnxruntime && pip install 'sdtrt[onnxruntime-gpu]'")
        # Failures reach the caller as exceptions (an allocation failure as OutOfMemory); ONNX Runtime
        # would also log each one to stderr, which would put a second, raw copy before the error line.
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4
        if graph_optimization_level not in OPT_LEVELS:
            raise SdtrtError(f"unknown graph_optimization_level {graph_optimization_level!r}.", f"use one of {', '.join(OPT_LEVELS)}")
        self._ort_device = (self.device.type, self.device.index or 0)
        self._shape_cache: dict[tuple, dict[str, tuple[int, ...]]] = {}
        self._sessions: dict[str, Any] = {}
        self._specs = model.specs
        self._dtypes: dict[str, dict[str, torch.dtype]] = {}
        self._session_args = (threads, inter_op_threads, graph_optimization_level, providers, dict(session_config or {}))
        self._weights: dict[str, tuple] = {}  # component -> the replaced initializers, kept alive for its session
        self._optimized_cache = optimized_cache and graph_optimization_level != "disable"
        self._lock = threading.Lock()  # guards creating a lazy session (two first calls make one session)
        self._available = sorted((components or set(model.files)) & set(model.files))
        for name in self._available:
            spec, precision = self._specs[name], model.dtype(name)
            self._dtypes[name] = {t.name: TORCH_DTYPES[t.concrete_dtype(precision)] for t in spec.inputs + spec.outputs}
        if preload not in PRELOAD:
            raise SdtrtError(f"unknown preload {preload!r}.", f"use one of {', '.join(PRELOAD)}")
        defaults = {n for n in model.family.default_components(model.meta.config) if not n.startswith("controlnet_")}
        self.prepare({"default": defaults, "all": set(self._available), "none": set()}[preload])

    def prepare(self, components) -> None:
        """Create the sessions of these components that do not exist yet, in parallel (ONNX Runtime
        releases the GIL while it optimizes and loads)."""
        with self._lock:
            todo = [n for n in self._available if n in set(components) and n not in self._sessions]
            if not todo:
                return
            with ThreadPoolExecutor(max_workers=len(todo)) as pool:
                for name, session in zip(todo, pool.map(lambda n: self._session(n, {}), todo)):
                    self._sessions[name] = session

    def _session_for(self, name: str):
        session = self._sessions.get(name)
        if session is None:
            with self._lock:
                session = self._sessions.get(name)
                if session is None:
                    session = self._sessions[name] = self._session(name, {})
        return session

    def _session(self, name: str, weights: Mapping[str, Any]):
        """An InferenceSession for one component; `weights` (initializer name -> OrtValue) replace the
        file's values before the graph is optimized (folding, pre-packing see the new values), which
        ONNX Runtime allows for initializers stored as external data - the export stores every weight
        matrix so."""
        import onnxruntime as ort

        threads, inter_op, level, providers, config = self._session_args
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = inter_op
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[level])
        opts.log_severity_level = 3
        for key, value in config.items():
            opts.add_session_config_entry(key, value)
        path = self.model.root / self.model.files[name].path
        providers = providers or self._providers()
        if weights:
            opts.add_external_initializers(list(weights), list(weights.values()))
            return self._create(ort, path, opts, providers)
        if not self._optimized_cache:
            return self._create(ort, path, opts, providers)
        provider = providers[0] if isinstance(providers[0], str) else providers[0][0]
        try:
            cache_key = ort_cache.key(path, self.model.files[name].sha256, level, provider, config)
        except OSError:  # the file is missing: _create says so, naming the fix
            return self._create(ort, path, opts, providers)
        optimized = ort_cache.cached(cache_key)
        if optimized is not None:
            fast = ort.SessionOptions()
            fast.intra_op_num_threads, fast.inter_op_num_threads, fast.log_severity_level = threads, inter_op, 3
            fast.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimized
            for key, value in config.items():
                fast.add_session_config_entry(key, value)
            try:
                return ort.InferenceSession(str(optimized), fast, providers=providers)
            except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt below, never an error
                ort_cache.discard(cache_key)
        writing = ort_cache.writer(cache_key, path)
        if writing is None:
            return self._create(ort, path, opts, providers)
        with writing as tmp:
            if tmp is not None:
                ort_cache.save_options(opts, tmp)
            return self._create(ort, path, opts, providers)

    def _create(self, ort, path: Path, opts, providers):
        try:
            return ort.InferenceSession(str(path), opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own exception types for damaged files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SdtrtError(f"ONNX Runtime cannot load {path}: {first[:300]}",
                             f"re-export the model: sdtrt export {self.model.meta.source.path} --out {self.model.root} --force") from None

    def set_weights(self, component: str, weights: Mapping[str, torch.Tensor]) -> None:
        """Run `component` with these initializers replaced (by name); every other one, and every one left
        out, takes the file's value. Calls already running finish on the previous session."""
        import onnxruntime as ort

        arrays = {k: v.detach().to("cpu").contiguous().numpy() for k, v in weights.items()}
        values = {k: ort.OrtValue.ortvalue_from_numpy(a) for k, a in arrays.items()}
        session = self._session(component, values)
        self._sessions[component], self._weights[component] = session, (arrays, values)

    def _providers(self) -> list:
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device).cuda_stream
            # run on torch's stream so that torch and ORT work is ordered without host syncs
            return [("CUDAExecutionProvider", {"device_id": self.device.index or 0, "user_compute_stream": str(stream)})]
        return ["CPUExecutionProvider"]

    def components(self) -> set[str]:
        return set(self._available)

    def input_dtype(self, component: str, tensor: str) -> torch.dtype:
        return self._dtypes[component][tensor]

    def check_shapes(self, component: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
        return None  # the ONNX files have dynamic axes for every symbol the runtime varies

    def run(self, component: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        session = self._session_for(component)
        key = (component, *(tuple(v.shape) for v in feeds.values()))
        shapes = self._shape_cache.get(key)
        if shapes is None:  # derived once per distinct input shapes, not per denoising step
            shapes = self._specs[component].output_shapes({k: tuple(v.shape) for k, v in feeds.items()})
            self._shape_cache[key] = shapes
        binding = _Binding(session, self._ort_device)  # one per call: concurrent calls never share bindings
        inputs = [x.contiguous() for x in feeds.values()]  # kept referenced until the run returns
        for name, x in zip(feeds, inputs):
            binding.bind_input(name, _NP[x.dtype], tuple(x.shape), x.data_ptr())
        dtypes = self._dtypes[component]
        outputs = {}
        for name, shape in shapes.items():
            out = torch.empty(shape, dtype=dtypes[name], device=self.device)
            binding.bind_output(name, _NP[out.dtype], shape, out.data_ptr())
            outputs[name] = out
        try:
            self._execute(binding)
        except RuntimeError as e:
            if "Failed to allocate memory" in str(e) or "bad_alloc" in str(e):
                size = re.search(r"buffer of size (\d+)", str(e))
                raise OutOfMemory(component, requested=int(size.group(1)) if size else None) from None
            raise
        return outputs

    def _execute(self, binding: "_Binding") -> None:
        """The engine call itself (benchmarks replace it with a no-op to measure runtime overhead)."""
        binding.run(self._run_options)


class _Binding:
    """IO binding on raw pointers. ONNX Runtime's public IOBinding wrapper re-creates its device
    descriptor and bookkeeping on every bind, which doubles the per-step cost for small latents;
    the binding object underneath takes the same arguments directly. Falls back to the public
    wrapper if a future onnxruntime moves that object."""

    def __init__(self, session, device: tuple[str, int]):
        self._session = session
        fast = _fast_device(device)
        if fast is not None:
            from onnxruntime.capi import _pybind_state as C

            self._binding = C.SessionIOBinding(session._sess)
            self._device = fast
            self._public = None
        else:
            self._public = session.io_binding()
            self._device_type, self._device_id = device

    def bind_input(self, name, np_type, shape, ptr) -> None:
        if self._public is None:
            self._binding.bind_input(name, self._device, np_type, shape, ptr)
        else:
            self._public.bind_input(name, self._device_type, self._device_id, np_type, shape, ptr)

    def bind_output(self, name, np_type, shape, ptr) -> None:
        if self._public is None:
            self._binding.bind_output(name, self._device, np_type, shape, ptr)
        else:
            self._public.bind_output(name, self._device_type, self._device_id, np_type, shape, ptr)

    def run(self, options=None) -> None:
        if self._public is None:
            self._session._sess.run_with_iobinding(self._binding, options)
        else:
            self._session.run_with_iobinding(self._public, options)


_DEVICES: dict[tuple[str, int], Any] = {}


def _fast_device(device: tuple[str, int]):
    """ONNX Runtime's C-level device descriptor, cached; None if this onnxruntime lacks the internals."""
    if device not in _DEVICES:
        try:
            from onnxruntime.capi import _pybind_state as C  # noqa: F401
            from onnxruntime.capi.onnxruntime_inference_collection import OrtDevice

            _DEVICES[device] = OrtDevice.make(*device)._get_c_device()
        except (ImportError, AttributeError):
            _DEVICES[device] = None
    return _DEVICES[device]
