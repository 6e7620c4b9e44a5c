"""ONNX Runtime backend: one InferenceSession per component, IO binding straight on torch tensors.

Inputs are bound at their data_ptr and outputs are written into torch tensors allocated per call,
so no tensor goes through numpy. InferenceSession.run is thread-safe and each call makes its own
binding and outputs, so one backend serves concurrent pipeline calls.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ...components import COMPONENTS, output_shapes
from ...errors import SdtrtError, require
from ..artifacts import ModelDir
from .base import TORCH_DTYPES

OPT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


def _np_dtype(dtype: torch.dtype):
    import numpy as np

    return {torch.float32: np.float32, torch.float16: np.float16, torch.int32: np.int32, torch.int64: np.int64}[dtype]


class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self, model: ModelDir, device: str | torch.device | None = None, threads: int = 0,
                 inter_op_threads: int = 0, graph_optimization_level: str = "all", providers: list | None = None,
                 components: set[str] | None = None, session_config: Mapping[str, str] | None = None):
        ort = require("onnxruntime", "onnxruntime", "the onnxruntime backend")
        self.model = model
        self.device = torch.device(device or "cpu")
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SdtrtError("device='cuda' needs onnxruntime's CUDA provider, which this onnxruntime lacks.",
                             "pip uninstall onnxruntime && pip install 'sdtrt[onnxruntime-gpu]' (or use device='cpu')")
        if graph_optimization_level not in OPT_LEVELS:
            raise SdtrtError(f"unknown graph_optimization_level {graph_optimization_level!r}.", f"use one of {', '.join(OPT_LEVELS)}")
        self._fixed = model.fixed_sizes
        self._sessions: dict[str, Any] = {}
        self._dtypes: dict[str, dict[str, torch.dtype]] = {}
        wanted = components or set(model.components)
        for name in sorted(wanted & set(model.components)):
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = inter_op_threads
            opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[graph_optimization_level])
            opts.log_severity_level = 3
            for key, value in (session_config or {}).items():
                opts.add_session_config_entry(key, value)
            self._sessions[name] = ort.InferenceSession(str(model.root / model.components[name]["path"]), opts,
                                                        providers=providers or self._providers())
            self._dtypes[name] = {t: TORCH_DTYPES[i["dtype"]] for t, i in {**model.components[name]["inputs"], **model.components[name]["outputs"]}.items()}

    def _providers(self) -> list:
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device).cuda_stream
            # run on torch's stream so that torch and ORT work is ordered without host syncs
            return [("CUDAExecutionProvider", {"device_id": self.device.index or 0, "user_compute_stream": str(stream)})]
        return ["CPUExecutionProvider"]

    def components(self) -> set[str]:
        return set(self._sessions)

    def input_dtype(self, component: str, tensor: str) -> torch.dtype:
        return self._dtypes[component][tensor]

    def check_shapes(self, component: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
        return None  # the ONNX files have dynamic axes for every symbol the runtime varies

    def run(self, component: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        session = self._sessions[component]
        spec = COMPONENTS[component]
        binding = session.io_binding()
        dev_type, dev_id = self.device.type, self.device.index or 0
        keep = []
        for name, x in feeds.items():
            x = x.contiguous()
            keep.append(x)
            binding.bind_input(name, dev_type, dev_id, _np_dtype(x.dtype), tuple(x.shape), x.data_ptr())
        shapes = output_shapes(spec, {k: tuple(v.shape) for k, v in feeds.items()}, self._fixed)
        outputs = {}
        for name, shape in shapes.items():
            out = torch.empty(shape, dtype=self._dtypes[component][name], device=self.device)
            binding.bind_output(name, dev_type, dev_id, _np_dtype(out.dtype), shape, out.data_ptr())
            outputs[name] = out
        session.run_with_iobinding(binding)
        return outputs
