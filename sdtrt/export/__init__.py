"""torch -> ONNX: load a diffusers folder, export each component, clean the graph, validate it."""

from .exporter import export_model

__all__ = ["export_model"]
