"""Reading a diffusers Stable Diffusion folder: what it is, whether sdtrt supports it, its weights."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import SdtrtError, require
from ..files import file_sha256

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
SUPPORTED_TEXT = "Stable Diffusion 1.x and 2.x (StableDiffusionPipeline / Img2Img / Inpaint folders)"
_UNSUPPORTED_HINTS = {
    "StableDiffusionXL": "SDXL",
    "StableDiffusion3": "Stable Diffusion 3",
    "Flux": "FLUX",
    "Kandinsky": "Kandinsky",
    "PixArt": "PixArt",
}
SAFE_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder")


@dataclasses.dataclass(frozen=True)
class SourceModel:
    path: Path
    pipeline_class: str
    family: str  # "sd1" or "sd2"
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    weight_files: tuple[Path, ...]
    pickle_weights: bool

    @property
    def default_size(self) -> int:
        return int(self.unet_config.get("sample_size", 64)) * 8

    @property
    def text_dim(self) -> int:
        return int(self.text_config["hidden_size"])

    @property
    def unet_in_channels(self) -> int:
        return int(self.unet_config.get("in_channels", 4))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SdtrtError(f"{path} is missing: this is not a complete diffusers model folder.",
                         "point at the folder that holds model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/") from None
    except json.JSONDecodeError as e:
        raise SdtrtError(f"{path} is not valid JSON ({e}).", "restore the file from the original checkpoint") from None


def _weights(folder: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    safe = sorted(folder.glob(f"*{SAFE_SUFFIX}"))
    if safe:
        return safe, False
    pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickled:
        raise SdtrtError(f"{folder} holds no weights (*.safetensors).", "re-download or re-save the component with safetensors")
    if not allow_pickle:
        raise SdtrtError(
            f"{folder} has weights only in pickle form ({pickled[0].name}); loading pickle can run arbitrary code.",
            "convert them to safetensors (pipe.save_pretrained(dir, safe_serialization=True)), "
            "or pass --allow-pickle if you trust the file",
        )
    return pickled, True


def inspect_source(model_dir: Path, allow_pickle: bool = False) -> SourceModel:
    """Check that `model_dir` is a diffusers SD folder sdtrt can export, without loading weights."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SdtrtError(f"model folder {model_dir} does not exist.",
                         "pass a diffusers folder, or make one: sdtrt make-model --preset tiny --out DIR")
    index_path = model_dir / "model_index.json"
    if not index_path.is_file():
        raise SdtrtError(f"{model_dir} has no model_index.json, so it is not a diffusers pipeline folder.",
                         "pass the folder diffusers' save_pretrained wrote (single-file .safetensors checkpoints "
                         "must be converted with diffusers' from_single_file(...).save_pretrained(DIR) first)")
    index = _read_json(index_path)
    cls = str(index.get("_class_name", ""))
    if cls not in SUPPORTED_PIPELINES:
        named = next((v for k, v in _UNSUPPORTED_HINTS.items() if cls.startswith(k)), cls or "an unknown pipeline")
        raise SdtrtError(f"{model_dir} is a {named} model ({cls}); sdtrt supports {SUPPORTED_TEXT}.",
                         "export a Stable Diffusion 1.x or 2.x model")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (model_dir / part).is_dir():
            raise SdtrtError(f"{model_dir} has no {part}/ folder.", "use a complete diffusers folder (all of unet, vae, text_encoder, tokenizer, scheduler)")
    unet = _read_json(model_dir / "unet" / "config.json")
    vae = _read_json(model_dir / "vae" / "config.json")
    text = _read_json(model_dir / "text_encoder" / "config.json")
    sched = _read_json(model_dir / "scheduler" / "scheduler_config.json")
    if unet.get("addition_embed_type") or (model_dir / "text_encoder_2").exists():
        raise SdtrtError(f"{model_dir} has an SDXL-style UNet (added text/time conditioning); sdtrt supports {SUPPORTED_TEXT}.",
                         "export a Stable Diffusion 1.x or 2.x model")
    if text.get("model_type", "clip_text_model") != "clip_text_model":
        raise SdtrtError(f"{model_dir}'s text encoder is {text.get('model_type')}, not a CLIP text model; sdtrt supports {SUPPORTED_TEXT}.",
                         "export a Stable Diffusion 1.x or 2.x model")
    # OpenAI CLIP (SD1.x) uses quick_gelu; OpenCLIP (SD2.x) uses exact gelu.
    family = "sd2" if text.get("hidden_act") == "gelu" else "sd1"
    files: list[Path] = []
    any_pickle = False
    for part in WEIGHT_COMPONENTS:
        found, pickled = _weights(model_dir / part, allow_pickle)
        files += found
        any_pickle |= pickled
    return SourceModel(model_dir, cls, family, unet, vae, text, sched, tuple(files), any_pickle)


def weights_sha256(files: tuple[Path, ...], root: Path) -> str:
    """One hash over every weight file (relative name and bytes), so any change to any file shows."""
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0")
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def load_modules(src: SourceModel, names: set[str]) -> dict[str, Any]:
    """Load the torch modules the requested components need, fp32, eval mode."""
    diffusers = require("diffusers", "export", "sdtrt export")
    transformers = require("transformers", "export", "sdtrt export")
    safe = not src.pickle_weights
    out: dict[str, Any] = {}
    if "text_encoder" in names:
        out["text_encoder"] = transformers.CLIPTextModel.from_pretrained(src.path / "text_encoder", use_safetensors=safe).eval()
    if "unet" in names:
        out["unet"] = diffusers.UNet2DConditionModel.from_pretrained(src.path, subfolder="unet", use_safetensors=safe).eval()
    if names & {"vae_decoder", "vae_encoder"}:
        out["vae"] = diffusers.AutoencoderKL.from_pretrained(src.path, subfolder="vae", use_safetensors=safe).eval()
    return out
