"""Reading what `sdtrt export` and `sdtrt build` wrote: one description of a model directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import SdtrtError

ONNX_METADATA = "sdtrt.json"
ENGINE_MANIFEST = "engines.json"


@dataclasses.dataclass(frozen=True)
class ModelDir:
    root: Path
    meta: dict[str, Any]  # sdtrt.json: facts about the model (family, dims, scheduler, tokenizer)
    manifest: dict[str, Any] | None  # engines.json for an engine directory, else None

    @property
    def kind(self) -> str:
        return "engines" if self.manifest is not None else "onnx"

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        return self.manifest["engines"] if self.manifest is not None else self.meta["components"]

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / self.meta["tokenizer"]["dir"]

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return dict(self.meta["scheduler_config"])

    @property
    def fixed_sizes(self) -> dict[str, int]:
        """Model constants of the ONNX contract (the symbols that do not vary per call)."""
        return {"D": int(self.meta["text_embedding_dim"]), "K": int(self.meta["clip_skip_max"]),
                "Cin": int(self.meta["unet_in_channels"])}

    @property
    def model_hash(self) -> str:
        """Short hash of the source weights (A1111's "Model hash" field)."""
        return self.meta["source"]["sha256"][:10]


def open_model_dir(path: Path | str) -> ModelDir:
    """An exported ONNX directory or a built engine directory; refuses anything else, naming the fix."""
    root = Path(path)
    if not root.is_dir():
        raise SdtrtError(f"{root} does not exist.", "pass a directory written by `sdtrt export` or `sdtrt build`")
    meta_path = root / ONNX_METADATA
    if not meta_path.is_file():
        hint = ("it looks like a diffusers model folder: export it first with `sdtrt export DIR --out ONNX_DIR`"
                if (root / "model_index.json").exists() else "pass a directory written by `sdtrt export` or `sdtrt build`")
        raise SdtrtError(f"{root} is not an sdtrt ONNX or engine directory (no {ONNX_METADATA}).", hint)
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "sdtrt-onnx":
        raise SdtrtError(f"{meta_path} is not sdtrt metadata.", "re-export the model with `sdtrt export`")
    manifest_path = root / ENGINE_MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    return ModelDir(root, meta, manifest)
