"""Model families, detected from model_index.json (never from weights or activations): its `_class_name`, and
where families share a pipeline class, the classes it names (Taiyi = StableDiffusionPipeline + BertModel).

Adding a family: a file here (config reader, components, conditioning), its entry in FAMILIES,
a preset in `sdtrt.models.presets`, and tests. Export, engines and the runtime read it from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import SdtrtError
from .base import Family, read_json
from .depth import Depth2Img
from .sd import StableDiffusion
from .sdxl import StableDiffusionXL
from .taiyi import Taiyi
from .unclip import UnCLIP
from .upscale import Upscaler

FAMILIES: dict[str, Family] = {f.name: f for f in (StableDiffusion(), StableDiffusionXL(), Taiyi(), Upscaler(), Depth2Img(), UnCLIP())}

_UNSUPPORTED_HINTS = {
    "StableDiffusion3": "Stable Diffusion 3",
    "Flux": "FLUX",
    "Kandinsky": "Kandinsky",
    "PixArt": "PixArt",
    "StableDiffusionControlNet": "a ControlNet pipeline",
}


def supported() -> str:
    return "; ".join(f"{f.title} ({', '.join(f.pipeline_classes)})" for f in FAMILIES.values())


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise SdtrtError(f"unknown model family {name!r}.", f"this sdtrt knows {', '.join(FAMILIES)}; upgrade sdtrt or re-export") from None


def detect(folder: Path) -> tuple[Family, dict[str, Any]]:
    """The family of a diffusers folder, from model_index.json; refuses unknown pipelines naming the supported ones."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise SdtrtError(f"{folder} has no model_index.json, so it is not a diffusers pipeline folder.",
                         "pass the folder diffusers' save_pretrained wrote (single-file .safetensors checkpoints "
                         "must be converted with diffusers' from_single_file(...).save_pretrained(DIR) first)")
    index = read_json(index_path)
    cls = str(index.get("_class_name", ""))
    for family in FAMILIES.values():
        if family.matches(index):
            return family, index
    named = next((v for k, v in _UNSUPPORTED_HINTS.items() if cls.startswith(k)), cls or "an unknown pipeline")
    raise SdtrtError(f"{folder} is a {named} model ({cls or 'no _class_name'}); sdtrt supports {supported()}.",
                     "export a model of a supported family")


__all__ = ["FAMILIES", "Family", "detect", "get", "supported"]
