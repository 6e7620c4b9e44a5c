"""sdtrt.json (what `sdtrt export` wrote) and engines.json (what `sdtrt build` wrote): typed,
versioned, and read and written only here.

Every fact sdtrt states about an export or an engine comes from these files (without a GPU an
engine cannot even be deserialized). A file that is missing, not JSON, of another format version or
missing fields is refused with the command that recreates it — never a KeyError.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from pathlib import Path
from typing import Any

from .errors import SdtrtError
from .files import write_text
from .models import families
from .models.families import Family
from .models.spec import ComponentSpec

ONNX_METADATA = "sdtrt.json"
ENGINE_MANIFEST = "engines.json"
ONNX_FORMAT, ENGINES_FORMAT = "sdtrt-onnx", "sdtrt-engines"
ONNX_VERSION = 3  # 2: family + the diffusers configs its specs are functions of; 3: weights keep their torch names
ENGINES_VERSION = 2


class BadMetadata(SdtrtError):
    pass


class FolderExpected(SdtrtError):
    """sdtrt.json or engines.json was given where its directory is meant."""

    def __init__(self, file: Path):
        self.file = Path(file)
        super().__init__(f"{file} is a file inside an sdtrt directory.", f"pass the folder, not the file: {self.file.parent}")


# --- sdtrt.json ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    path: str
    sha256: str  # one hash over every weight file (A1111's "Model hash" is its first 10 hex digits)


@dataclasses.dataclass(frozen=True)
class OnnxFile:
    path: str  # relative to the ONNX dir
    dtype: str  # fp32 | fp16
    sha256: str
    size_bytes: int
    external_data: bool
    export_seconds: float = 0.0
    weights: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # torch name -> shape of each weight matrix (initializer = spec.prefix + name)
    unused: list[str] = dataclasses.field(default_factory=list)  # of those, the ones the graph never reads (pruned: e.g. SDXL's last text layer)


@dataclasses.dataclass(frozen=True)
class AdapterRecord:
    """A LoRA / LyCORIS file merged into the weights at export."""

    path: str
    sha256: str
    scale: float


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    dir: str
    files: list[str]


@dataclasses.dataclass(frozen=True)
class ExportMeta:
    family: str
    pipeline_class: str
    config: dict[str, Any]  # the family's model config (see models/families)
    components: dict[str, OnnxFile]
    tokenizers: dict[str, Tokenizer]  # text encoder component -> its tokenizer files
    scheduler_config: dict[str, Any]
    source: Source
    dtype: str
    opset: int
    default_size: list[int]  # [height, width]
    sdtrt_version: str
    torch_version: str = ""
    python: str = ""
    export_seconds: float = 0.0
    validation: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    adapters: list[AdapterRecord] = dataclasses.field(default_factory=list)  # merged at export, in order
    embedding_slots: int = 0  # token-embedding rows reserved after the vocabulary for Textual Inversion
    format: str = ONNX_FORMAT
    format_version: int = ONNX_VERSION

    def write(self, folder: Path) -> None:
        write_text(Path(folder) / ONNX_METADATA, json.dumps(dataclasses.asdict(self), indent=2) + "\n")


# --- engines.json ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Library:
    name: str  # tensorrt | tensorrt-rtx
    module: str
    version: str


@dataclasses.dataclass(frozen=True)
class EngineFile:
    path: str
    dtype: str
    sha256: str
    size_bytes: int
    onnx_sha256: str
    cache_key: str
    profile: dict[str, list[list[int]]]  # input -> [min, opt, max] shapes
    build_seconds: float
    layers: dict[str, int]
    cache_hit: bool = False
    no_gpu_messages_suppressed: int = 0


@dataclasses.dataclass(frozen=True)
class EngineManifest:
    backend: Library
    targets: list[str]
    flags: dict[str, Any]
    engines: dict[str, EngineFile]
    onnx_dir: str
    weights_sha256: str
    sdtrt_version: str
    build_machine_gpu: str | None = None
    built_at: str = ""
    build_seconds: float = 0.0
    peak_rss_mb: float = 0.0
    format: str = ENGINES_FORMAT
    format_version: int = ENGINES_VERSION

    def write(self, folder: Path) -> None:
        write_text(Path(folder) / ENGINE_MANIFEST, json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    def rebuild_command(self, engine_dir: Path) -> str:
        return f"sdtrt build {self.onnx_dir} --out {engine_dir} --force --backend {self.backend.name}"


# --- a model directory -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """An ONNX directory (meta only) or an engine directory (meta + manifest)."""

    root: Path
    meta: ExportMeta
    manifest: EngineManifest | None

    @property
    def kind(self) -> str:
        return "engines" if self.manifest is not None else "onnx"

    @property
    def family(self) -> Family:
        return families.get(self.meta.family)

    @functools.cached_property
    def specs(self) -> dict[str, ComponentSpec]:
        """Specs of the components this directory holds."""
        every = self.family.components(self.meta.config)
        return {name: every[name] for name in self.files}

    @property
    def files(self) -> dict[str, OnnxFile | EngineFile]:
        return dict(self.manifest.engines) if self.manifest is not None else dict(self.meta.components)

    def dtype(self, component: str) -> str:
        return self.files[component].dtype

    @property
    def model_hash(self) -> str:
        return self.meta.source.sha256[:10]

    def tokenizer_dir(self, encoder: str) -> Path:
        return self.root / self.meta.tokenizers[encoder].dir


def open_model_dir(path: Path | str) -> ModelDir:
    """An exported ONNX directory or a built engine directory; refuses anything else, naming the fix."""
    root = Path(path)
    if root.is_file() and root.name in (ONNX_METADATA, ENGINE_MANIFEST):
        raise FolderExpected(root)
    if not root.is_dir():
        raise SdtrtError(f"{root} does not exist." if not root.exists() else f"{root} is a file, not a directory.",
                         "pass a directory written by `sdtrt export` or `sdtrt build`")
    meta_path = root / ONNX_METADATA
    if not meta_path.is_file():
        hint = ("it looks like a diffusers model folder: export it first with `sdtrt export DIR --out ONNX_DIR`"
                if (root / "model_index.json").exists() else "pass a directory written by `sdtrt export` or `sdtrt build`")
        raise SdtrtError(f"{root} is not an sdtrt ONNX or engine directory (no {ONNX_METADATA}).", hint)
    meta = _read(meta_path, ExportMeta, ONNX_FORMAT, ONNX_VERSION, "re-export the model: sdtrt export MODEL_DIR --out "
                 f"{root} --force")
    try:
        families.get(meta.family)
    except SdtrtError as e:
        raise BadMetadata(f"{meta_path}: {e.problem}", f"{e.fix}: sdtrt export {meta.source.path} --out {root} --force") from None
    manifest = None
    if (root / ENGINE_MANIFEST).is_file():
        manifest = _read(root / ENGINE_MANIFEST, EngineManifest, ENGINES_FORMAT, ENGINES_VERSION,
                         f"rebuild the engines: sdtrt build ONNX_DIR --out {root} --force")
    model = ModelDir(root, meta, manifest)
    missing = [name for name, f in model.files.items() if not (root / f.path).is_file()]
    if missing:
        fix = (manifest.rebuild_command(root) if manifest else f"re-export: sdtrt export {meta.source.path} --out {root} --force")
        raise SdtrtError(f"{root} lists {', '.join(missing)} but the file is missing "
                         f"({', '.join(str(root / model.files[m].path) for m in missing)}).", fix)
    return model


def _read(path: Path, cls: type, fmt: str, version: int, fix: str):
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadMetadata(f"{path} is not valid JSON ({e}).", fix) from None
    except OSError as e:
        raise BadMetadata(f"{path} cannot be read ({e.strerror}).", "check the file's permissions") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise BadMetadata(f"{path} is not an sdtrt {fmt} file.", fix)
    if data.get("format_version") != version:
        raise BadMetadata(f"{path} has format version {data.get('format_version')!r}; this sdtrt reads version {version}.", fix)
    try:
        return _typed(cls, data, path.name)
    except _Mismatch as e:
        raise BadMetadata(f"{path} is damaged: {e}.", fix) from None


class _Mismatch(Exception):
    pass


def _typed(tp, value, where: str):
    """`value` (parsed JSON) checked against the annotation `tp`, dataclasses built recursively."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Mismatch(f"{where} is not an object")
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in value:
                kwargs[f.name] = _typed(hints[f.name], value[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _Mismatch(f"{where} lacks '{f.name}'")
        return tp(**kwargs)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _typed(arg, value, where)
            except _Mismatch:
                pass
        raise _Mismatch(f"{where} has an unexpected value {value!r:.40}")
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _Mismatch(f"{where} is not an object")
        return {k: _typed(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        (it,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _Mismatch(f"{where} is not a list")
        return [_typed(it, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise _Mismatch(f"{where} is not null")
        return None
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise _Mismatch(f"{where} is not a {tp.__name__}")
    return value
