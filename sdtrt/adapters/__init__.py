"""Adapters: LoRA, LyCORIS (LoCon, LoHa, LoKr) and Textual Inversion files, read into what sdtrt applies.

Pure torch; nothing here knows ONNX or engines. A LoRA-like file becomes an `Adapter`: one layer per
weight it changes, addressed by (component subfolder, torch parameter name), whose
`deltas(scale)` are fp32 tensors of exactly the parameter's shape, so that a merged weight is
W + Σ scale·ΔW. An embedding file becomes an `Embedding`: per text encoder the rows of its new tokens.

  files.py       reading safetensors / opt-in pickle; NaN checks
  names.py       the weights a model has (`weights_for(config)`) and every name files use for them
  layers.py      the math: LoRA, LoHa, LoKr -> ΔW
  lora.py        key formats (kohya, LyCORIS, diffusers/peft) -> `Adapter`
  embeddings.py  Textual Inversion layouts -> `Embedding`

    weights = weights_for(config)              # config: Family.read_config(...), or sdtrt.json's
    adapter = parse_adapter("style.safetensors", weights)
    for (component, param), delta in adapter.deltas(0.8).items(): ...
    emb = parse_embedding("cat.pt", text_widths(config), allow_pickle=True)
"""

from .embeddings import Embedding, parse_embedding, text_widths
from .lora import Adapter, Target, parse_adapter
from .names import Weights, weights_for

__all__ = ["Adapter", "Embedding", "Target", "Weights", "parse_adapter", "parse_embedding", "text_widths", "weights_for"]
