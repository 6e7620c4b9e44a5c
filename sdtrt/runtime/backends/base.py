"""The one protocol every backend implements: named components, torch tensors in and out."""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import torch

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32, "int64": torch.int64}


@runtime_checkable
class Backend(Protocol):
    name: str
    device: torch.device

    def components(self) -> set[str]:
        """The component names this backend can run."""
        ...

    def input_dtype(self, component: str, tensor: str) -> torch.dtype:
        """The dtype the component expects for an input (callers cast once, outside loops)."""
        ...

    def run(self, component: str, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run one component. Inputs must already be on `device` in `input_dtype`; outputs are fresh
        tensors the caller owns (never buffers the backend reuses), on `device`."""
        ...

    def check_shapes(self, component: str, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise SdtrtError (naming the fix) if the component cannot take these input shapes."""
        ...

    def set_weights(self, component: str, weights: Mapping[str, torch.Tensor]) -> None:
        """Run the component with these weights (by ONNX initializer name) in place of its own; a name left
        out takes the original value again. Used by LoRA switching and Textual Inversion."""
        ...
