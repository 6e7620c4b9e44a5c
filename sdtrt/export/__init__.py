"""torch -> ONNX: `export_model(model_dir, out)`.

  source.py    which family a diffusers folder is (from model_index.json) and its weights; loads nothing
  exporter.py  per component (one torch module in memory at a time): trace -> clean -> validate -> sdtrt.json
  graph.py     torch.onnx export, constant folding, shape inference, external data for files over 2 GB
  validate.py  ONNX Runtime vs the fp32 torch module on real-shaped inputs, per the component spec's tolerance

What to export and how each network is wrapped comes from the component specs (sdtrt.models).
"""

from .exporter import export_model

__all__ = ["export_model"]
