"""Reading a diffusers pipeline folder: which family it is, whether sdtrt supports it, its weights.
Nothing is loaded here; the component specs' loaders do that, one network at a time."""

from __future__ import annotations

import dataclasses
import hashlib
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import SdtrtError
from ..files import file_sha256
from ..models import families
from ..models.families import Family
from ..models.families.base import read_json
from ..models.spec import ComponentSpec
from ..runtime.text.factory import tokenizer_kind

SAFE_SUFFIX = ".safetensors"
MAKE_ONE = "`sdtrt make-model --preset tiny --out DIR` makes one"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")


@dataclasses.dataclass(frozen=True)
class SourceModel:
    path: Path
    pipeline_class: str
    family: Family
    config: dict[str, Any]  # the family's model config (stored in sdtrt.json)
    scheduler_config: dict[str, Any]
    weight_files: tuple[Path, ...]
    pickle_weights: bool

    @cached_property
    def specs(self) -> dict[str, ComponentSpec]:
        return self.family.components(self.config)

    @property
    def default_size(self) -> tuple[int, int]:
        return self.family.default_size(self.config)


def _weights(folder: Path, allow_pickle: bool) -> tuple[list[Path], bool]:
    if not folder.is_dir():
        raise SdtrtError(f"{folder} is missing: this is not a complete diffusers model folder.",
                         "point at the folder diffusers' save_pretrained wrote (one folder per component)")
    safe = sorted(folder.glob(f"*{SAFE_SUFFIX}"))
    if safe:
        return safe, False
    pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickled:
        raise SdtrtError(f"{folder} holds no weights (*.safetensors).", "re-download or re-save the component with safetensors")
    if not allow_pickle:
        fix = ("convert them to safetensors (pipe.save_pretrained(dir, safe_serialization=True)), "
               "or pass --allow-pickle if you trust the file")
        raise SdtrtError(f"{folder} has weights only in pickle form ({pickled[0].name}); loading pickle can run arbitrary code.",
                         fix, cli_fix=fix)
    return pickled, True


def inspect_source(model_dir: Path, allow_pickle: bool = False) -> SourceModel:
    """Check that `model_dir` is a diffusers folder of a family sdtrt can export, without loading weights."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SdtrtError(f"model folder {model_dir} does not exist." if not model_dir.exists() else f"{model_dir} is a file, not a model folder.",
                         f"pass a diffusers folder ({MAKE_ONE})")
    try:
        family, index = families.detect(model_dir)
        config = family.read_config(model_dir, index)
        for encoder in family.present_text_encoders(config):
            tokenizer_kind(model_dir / family.tokenizer_folder(encoder))  # CLIP BPE or WordPiece files, else refused
        files: list[Path] = []
        any_pickle = False
        for part in family.weight_folders(config):
            found, pickled = _weights(model_dir / part, allow_pickle)
            files += found
            any_pickle |= pickled
        scheduler = {k: v for k, v in read_json(model_dir / "scheduler" / "scheduler_config.json").items()
                     if not k.startswith("_diffusers")}
    except SdtrtError as e:
        if e.cli_fix:
            raise  # already worded for the command line (--allow-pickle)
        raise SdtrtError(e.problem, e.fix, cli_fix=f"{e.fix}; or pass another model folder ({MAKE_ONE})") from None
    return SourceModel(model_dir, str(index["_class_name"]), family, config, scheduler, tuple(files), any_pickle)


def weights_sha256(files: tuple[Path, ...], root: Path) -> str:
    """One hash over every weight file (relative name and bytes), so any change to any file shows."""
    h = hashlib.sha256()
    for f in files:
        name = f.relative_to(root) if f.is_relative_to(root) else Path(f.parent.name) / f.name  # ControlNets live outside
        h.update(str(name).encode() + b"\0")
        h.update(file_sha256(f).encode())
    return h.hexdigest()
