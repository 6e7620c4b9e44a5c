"""AOTInductor backend: runs the `.pt2` packages `sdtrt build --backend aoti` compiled.

Before a package is loaded, engines.json is checked: torch's version (a package only loads in the torch
that compiled it), the device (and a GPU's compute capability), and each file's sha256. Calls are
refused outside the compiled ranges with the range and the build flag. On CUDA, `cuda_graphs=True`
captures one graph per component and input shapes and replays it (static buffers in, outputs cloned out,
so callers still own what they get).
"""

from __future__ import annotations

import threading
from typing import Any, Mapping

import torch

from ...artifacts import ModelDir
from ...errors import SdtrtError
from ...files import file_sha256
from .base import TORCH_DTYPES
from .profile_check import check_profile


def _rebuild(model: ModelDir) -> str:
    m = model.manifest
    return f"sdtrt build {m.onnx_dir} --out {model.root} --force --backend aoti --device {m.flags.get('device', 'cpu')}"


class AotiBackend:
    name = "aoti"

    def __init__(self, model: ModelDir, device: str | torch.device | None = None, verify: bool = True,
                 cuda_graphs: bool = False, components: set[str] | None = None):
        m = model.manifest
        self.model = model
        if m.backend.name != "aoti":
            raise SdtrtError(f"{model.root} holds {m.backend.name} engines, not AOTInductor packages.", "use backend='tensorrt'")
        if m.backend.version != torch.__version__:
            raise SdtrtError(f"the packages in {model.root} were compiled by torch {m.backend.version}; this is torch {torch.__version__}, "
                             "and a package only loads in the torch that compiled it.", f"recompile: {_rebuild(model)}")
        built_for = m.targets[0]
        self.device = torch.device(device or ("cuda" if built_for.startswith("cuda") else "cpu"))
        if built_for.startswith("cuda"):
            if not torch.cuda.is_available():
                raise SdtrtError(f"the packages in {model.root} were compiled for a GPU ({built_for}) and none is visible.",
                                 f"compile for this machine: {_rebuild(model).replace('--device cuda', '--device cpu')}")
            major, minor = torch.cuda.get_device_capability(self.device)
            if built_for != f"cuda-sm{major}{minor}":
                raise SdtrtError(f"the packages were compiled for {built_for}; this GPU is sm{major}{minor}.", f"recompile on it: {_rebuild(model)}")
        elif self.device.type != "cpu":
            raise SdtrtError(f"the packages were compiled for the CPU, not {self.device}.", "pass device='cpu'")
        self._engines = m.engines
        if verify:
            for name, entry in self._engines.items():
                path = model.root / entry.path
                if not path.is_file() or file_sha256(path) != entry.sha256:
                    raise SdtrtError(f"{path} does not match engines.json (missing, changed or damaged).", f"recompile: {_rebuild(model)}")
        self._specs = model.specs
        wanted = components or set(self._engines)
        self._names = sorted(wanted & set(self._engines))
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._graphs = {} if cuda_graphs and self.device.type == "cuda" else None

    def components(self) -> set[str]:
        return set(self._names)

    def input_dtype(self, component: str, tensor: str) -> torch.dtype:
        return TORCH_DTYPES[self._specs[component].tensor(tensor).concrete_dtype(self._engines[component].dtype)]

    def check_shapes(self, component: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
        check_profile(self._specs[component], self._engines[component].profile, shapes, _rebuild(self.model))

    def _package(self, component: str):
        """Loaded on first use: a request that needs no VAE encoder never pays for it."""
        if component not in self._loaded:
            with self._lock:
                if component not in self._loaded:
                    self._loaded[component] = torch._inductor.aoti_load_package(str(self.model.root / self._engines[component].path))
        return self._loaded[component]

    def run(self, component: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.check_shapes(component, {k: tuple(v.shape) for k, v in feeds.items()})
        spec = self._specs[component]
        args = [feeds[name].contiguous() for name in spec.input_names]
        if self._graphs is not None:
            outputs = self._graphed(component, args)
        else:
            with torch.no_grad():
                outputs = self._package(component)(*args)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        return dict(zip(spec.output_names, outputs))

    def _graphed(self, component: str, args: list[torch.Tensor]) -> list[torch.Tensor]:
        key = (component, *(tuple(a.shape) for a in args))
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                package = self._package(component)
                static = [a.clone() for a in args]
                with torch.no_grad():
                    package(*static)  # warm-up outside capture (allocations, lazy init)
                    torch.cuda.synchronize(self.device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        out = package(*static)
                entry = self._graphs[key] = (graph, static, out if isinstance(out, (list, tuple)) else [out])
            graph, static, out = entry
            for s, a in zip(static, args):
                s.copy_(a)
            graph.replay()
            return [o.clone() for o in out]

    def set_weights(self, component: str, weights: Mapping[str, torch.Tensor]) -> None:
        raise SdtrtError("AOTInductor packages have their weights compiled in; LoRA switching and embeddings need the "
                         "onnxruntime or tensorrt backend.", "merge LoRAs before compiling (sdtrt export --lora), or use backend='onnxruntime'")
