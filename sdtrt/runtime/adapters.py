"""LoRA / LyCORIS switching and Textual Inversion on an existing export or engine directory.

The weights a pipeline runs with are always recomputed from the export's own (the "base"):

    W = W_base + Σ_i scale_i · ΔW_i        for every weight some active adapter changes
    W = W_base                             for every weight an earlier set changed and this one does not

so a set of adapters gives the same weights however it was reached (A -> B -> A gives A's image bit
for bit; an empty set restores the export exactly). Weights are addressed by name: the export keeps
each weight matrix's torch parameter name (spec.prefix + name) as its ONNX initializer, and the
backend replaces initializers (ONNX Runtime) or refits engines (TensorRT) by that name.

Textual Inversion uses embedding rows the export reserved after the vocabulary (`embedding_slots`):
a new token gets the next free id in every tokenizer, its vectors go into those rows of each text
encoder's token embedding, and nothing is re-exported. Base values are read from the ONNX files on
first use (with the `onnx` package) and kept only for the weights that adapters touch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from ..artifacts import ModelDir
from ..errors import SdtrtError, require
from .backends.base import TORCH_DTYPES


def read_initializers(path: Path, names: set[str]) -> dict[str, torch.Tensor]:
    """The named initializers of an ONNX file (external data included) as torch tensors."""
    onnx = require("onnx", "adapters", "switching LoRAs or loading embeddings at run time")
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    found = {}
    for t in model.graph.initializer:
        if t.name in names:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                found[t.name] = _external(t, path)
            else:
                found[t.name] = torch.from_numpy(numpy_helper.to_array(t).copy())
    missing = names - set(found)
    if missing:
        raise SdtrtError(f"{path} has no weight named {sorted(missing)[0]} ({len(missing)} missing).",
                         "re-export the model with this sdtrt (weights keep their torch names since sdtrt export format 2)")
    return found


def _external(t, path: Path) -> torch.Tensor:
    """One externally stored initializer, read here rather than by onnx's helper: that helper refuses data
    files with several hard links (a guard for untrusted models), which an export copied with `cp -al` or
    a deployment's hard-linked cache has. What the guard protects against is still checked: the file is a
    plain name beside the graph, and the bytes asked for lie inside it."""
    import numpy as np
    from onnx.helper import tensor_dtype_to_np_dtype

    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    if not location or Path(location).name != location or location in (".", ".."):
        raise SdtrtError(f"{path}: the weight {t.name} points at {location!r}, not a file beside the graph.",
                         "re-export the model with sdtrt export")
    data = path.parent / location
    offset, dtype = int(info.get("offset", 0)), np.dtype(tensor_dtype_to_np_dtype(t.data_type))
    count = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    length = int(info.get("length", count * dtype.itemsize))
    if length != count * dtype.itemsize or offset < 0 or offset + length > data.stat().st_size:
        raise SdtrtError(f"{data} is shorter than its graph says ({t.name}: bytes {offset}..{offset + length}).",
                         "re-export the model with sdtrt export (the file was truncated or replaced)")
    with open(data, "rb") as f:
        f.seek(offset)
        array = np.frombuffer(f.read(length), dtype=dtype).reshape(tuple(t.dims)).copy()
    return torch.from_numpy(array)


def lora_from_dir(name: str, folder: Path | None) -> Path:
    """The file an A1111 tag `<lora:NAME:...>` means: NAME(.safetensors|.pt|.ckpt) directly inside
    `folder`. Names never reach the filesystem as paths: no separators, no '..', nothing outside it."""
    if folder is None:
        raise SdtrtError(f"the prompt asks for <lora:{name}> but no LoRA folder was given.", "pass lora_dir=...",
                         cli_fix="pass --lora-dir DIR (the folder holding NAME.safetensors)")
    if not name or name in (".", "..") or any(c in name for c in ("/", "\\", "\0")) or name.startswith("."):
        raise SdtrtError(f"<lora:{name}> is not a file name: LoRA names are looked up only inside the LoRA folder.",
                         "use the file's name without folders", cli_fix="use the file's name inside --lora-dir, without folders")
    for suffix in (".safetensors", ".pt", ".ckpt", ".bin"):
        path = Path(folder) / f"{name}{suffix}"
        if path.is_file():
            return path
    raise SdtrtError(f"<lora:{name}>: there is no {name}.safetensors in {folder}.",
                     "put the file there or fix the name", cli_fix=f"put {name}.safetensors in --lora-dir {folder}, or fix the tag")


class Adapters:
    """The active LoRAs and loaded embeddings of one pipeline, and the weights they imply."""

    def __init__(self, model: ModelDir, backend, tokenizers: dict):
        self.model, self.backend, self.tokenizers = model, backend, tokenizers
        self.loras: list[tuple[object, float]] = []
        self.embeddings: dict[str, tuple[object, list[int]]] = {}  # token -> (Embedding, its ids)
        self._base: dict[tuple[str, str], torch.Tensor] = {}  # (component, initializer) -> base value
        self._touched: dict[str, set[str]] = {}  # component -> initializers ever replaced
        self._specs = model.family.components(model.meta.config)
        self._subfolder = {spec.weights: name for name, spec in self._specs.items() if spec.weights != "vae"}

    # --- what adapter files can address ----------------------------------------------------------

    def weights(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """{subfolder: {torch parameter name: shape}} of the weight matrices this export exposes."""
        out: dict[str, dict[str, tuple[int, ...]]] = {}
        for name, f in self.model.meta.components.items():
            spec = self._specs[name]
            if spec.weights != "vae":
                out[spec.weights] = {p: tuple(s) for p, s in f.weights.items()}
        return out

    def widths(self) -> dict[str, int]:
        return {e: int(self.model.meta.config[e]["hidden_size"]) for e in self.model.meta.tokenizers}

    # --- changes -------------------------------------------------------------------------------

    def set_loras(self, loras: Sequence[tuple[str | Path, float]], allow_pickle: bool = False) -> None:
        """Make exactly these (file, scale) pairs active. Every file is read and checked before any
        weight changes, so a bad file leaves the pipeline as it was."""
        from ..adapters import parse_adapter

        table = self.weights()
        parsed = []
        for item in loras:
            path, scale = item if isinstance(item, (tuple, list)) else (item, 1.0)
            if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
                raise SdtrtError(f"LoRA scale {scale!r} for {path} is not a finite number.", "pass e.g. (path, 0.8)",
                                 cli_fix="write --lora FILE:0.8")
            parsed.append((parse_adapter(path, table, allow_pickle=allow_pickle), float(scale)))
        self.loras = parsed
        self._apply()

    def load_embedding(self, path: str | Path, token: str | None = None, allow_pickle: bool = False) -> list[str]:
        """Add a Textual Inversion embedding; returns its tokens (token, token_1, ... for several vectors)."""
        from ..adapters import parse_embedding

        emb = parse_embedding(path, self.widths(), token, allow_pickle=allow_pickle)
        tokenizer = next(iter(self.tokenizers.values()))
        clash = [t for t in emb.tokens if t in self.embeddings or t in tokenizer.vocab or t in tokenizer.added]
        if clash:
            raise SdtrtError(f"the token {clash[0]!r} of {Path(path).name} is already in the vocabulary or loaded.",
                             "pass another token (token=... / --embedding FILE:TOKEN)")
        first = self._next_free_id()
        ids = list(range(first, first + len(emb.tokens)))
        if ids[-1] >= self._rows():
            raise SdtrtError(f"{Path(path).name} needs {len(ids)} embedding rows, but only {self._rows() - first} of this "
                             f"export's {self.model.meta.embedding_slots} reserved rows are free.",
                             "re-export with more rows: sdtrt export MODEL --out DIR --embedding-slots N")
        # tokenizers first: one that cannot take embeddings (WordPiece) refuses before anything is recorded
        for tok in self.tokenizers.values():
            tok.add_tokens({t: i for t, i in zip(emb.tokens, ids)}, expand={emb.token: ids})
        self.embeddings[emb.token] = (emb, ids)
        try:
            self._apply()
        except BaseException:  # leave no half-loaded embedding behind (a later set_loras would trip on it)
            del self.embeddings[emb.token]
            for tok in self.tokenizers.values():
                tok.remove_tokens(emb.tokens, emb.token)
            raise
        return emb.tokens

    # --- the weights those imply -------------------------------------------------------------------

    def _vocab(self) -> int:
        return int(self.model.meta.config[next(iter(self.model.meta.tokenizers))].get("vocab_size", 49408))

    def _rows(self) -> int:
        return self._vocab() + self.model.meta.embedding_slots

    def _next_free_id(self) -> int:
        used = [i for _, ids in self.embeddings.values() for i in ids]
        return max(used, default=self._vocab() - 1) + 1

    def _base_value(self, component: str, names: set[str]) -> dict[str, torch.Tensor]:
        missing = {n for n in names if (component, n) not in self._base}
        if missing:
            for n, t in read_initializers(self._onnx_path(component), missing).items():
                self._base[(component, n)] = t
        return {n: self._base[(component, n)] for n in names}

    def _onnx_path(self, component: str) -> Path:
        f = self.model.meta.components[component]
        root = Path(self.model.manifest.onnx_dir) if self.model.manifest is not None else self.model.root
        path = root / f.path
        if not path.is_file():
            raise SdtrtError(f"{path} (the ONNX these engines were built from) is missing; its weights are the base "
                             "that adapters are added to.", f"keep or re-create the ONNX directory {root}")
        return path

    def _apply(self) -> None:
        """Compute every replaced weight from the base and hand each component's full set to the backend."""
        deltas: dict[str, dict[str, torch.Tensor]] = {}
        for adapter, scale in self.loras:  # in the given order, so sums are reproducible to the bit
            for (subfolder, param), delta in adapter.deltas(scale).items():
                component = self._subfolder[subfolder]
                if param in self.model.meta.components[component].unused:
                    continue  # a weight the exported graph never reads (as in diffusers, it changes nothing)
                name = self._specs[component].prefix + param
                acc = deltas.setdefault(component, {})
                acc[name] = acc[name] + delta if name in acc else delta
        rows: dict[str, dict[int, torch.Tensor]] = {}
        for emb, ids in self.embeddings.values():
            for subfolder, vectors in emb.vectors.items():
                for i, v in zip(ids, vectors):
                    rows.setdefault(self._subfolder[subfolder], {})[i] = v
        for component in set(deltas) | set(rows) | set(self._touched):
            spec = self._specs[component]
            table = self.model.meta.components[component].weights
            embedding = next((spec.prefix + p for p in table if p.endswith("token_embedding.weight")), None)
            names = set(deltas.get(component, {})) | ({embedding} if rows.get(component) else set())
            dtype = TORCH_DTYPES["float16" if self.model.dtype(component) == "fp16" else "float32"]
            base = self._base_value(component, names | self._touched.get(component, set()))
            values = {n: base[n] for n in self._touched.get(component, set()) - names}  # restore what is no longer changed
            for n, d in deltas.get(component, {}).items():
                values[n] = (base[n].float() + d).to(dtype)
            if rows.get(component):
                matrix = base[embedding].clone()
                for i, v in rows[component].items():
                    matrix[i] = v.to(matrix.dtype)
                values[embedding] = matrix
            self.backend.set_weights(component, values)
            # ever-changed names stay in every later set (with their base value once no adapter changes
            # them): an engine keeps what it was refitted with, so restoring must be explicit
            self._touched[component] = self._touched.get(component, set()) | names
