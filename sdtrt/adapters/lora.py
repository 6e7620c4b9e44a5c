"""LoRA-like adapter files -> ΔW per torch parameter: `parse_adapter(path, weights)`.

Key formats, per key (a file may mix them):

  kohya-ss / LyCORIS   lora_unet_<module>.<part>, lora_te_ / lora_te1_ (text_encoder), lora_te2_
                       (text_encoder_2); <module> is the dotted path with "_" for "." (diffusers
                       names for SD 1.x/2.x, SGM names for SDXL); <part> lora_down.weight,
                       lora_up.weight, alpha, hada_w1_a, ..., lokr_w1, ...
  diffusers / peft     <component>.<module>.lora_A.weight / lora_B.weight (also .lora.down/.lora.up,
                       .lora_linear_layer.down/.up, the old .processor.to_q_lora.down form, and
                       .base_layer inside the module path), optional <component>.<module>.alpha;
                       alpha also from the file's `lora_adapter_metadata` (lora_alpha, alpha_pattern,
                       use_rslora) as diffusers writes it.

Scale: alpha / rank, or 1 without an alpha (kohya: alpha missing means alpha = rank).

Refused, naming the keys, so that nothing is ever half-applied: keys that match no weight of the
model (an adapter for another architecture), tensors of unsupported kinds (DoRA, Tucker cores,
unknown parts), NaN/inf values, factors whose ΔW does not have the weight's shape, and two entries
for one weight.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Mapping

from torch import Tensor

from ..errors import SdtrtError
from ..files import file_sha256
from .files import listing, non_finite, read_file
from .layers import Layer, Unfit, kind, layer
from .names import TEXT_ENCODERS, Weights, kohya_names

Target = tuple[str, str]  # (component subfolder, torch parameter name)

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te_": "text_encoder"}
PEFT_COMPONENTS = ("unet", *TEXT_ENCODERS)
PEFT_PARTS = {  # suffix -> the kohya/LyCORIS part name it is
    ".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
    ".lora.down.weight": "lora_down.weight", ".lora.up.weight": "lora_up.weight",
    ".lora_linear_layer.down.weight": "lora_down.weight", ".lora_linear_layer.up.weight": "lora_up.weight",
    ".lora_B.bias": "lora_up.bias", ".lora_magnitude_vector": "lora_magnitude_vector",
    ".lora_magnitude_vector.weight": "lora_magnitude_vector", ".alpha": "alpha",
}
OLD_ATTENTION = re.compile(r"^(.*?)(?:\.processor)?\.to_(q|k|v|out)_lora\.(down|up)\.weight$")  # diffusers before peft
OLD_PROJ = {"unet": {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"},
            "text": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}}
EMBEDDING_KEYS = {"emb_params", "clip_l", "clip_g", "string_to_param", "string_to_param.*"}
FIX_FORMAT = "pass a LoRA, LoCon, LoHa or LoKr file (kohya, LyCORIS or diffusers/peft keys)"


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A parsed adapter file: one layer per weight it changes."""

    path: Path
    sha256: str
    layers: Mapping[Target, Layer] = dataclasses.field(repr=False)

    @property
    def targets(self) -> tuple[Target, ...]:
        return tuple(self.layers)

    @property
    def components(self) -> tuple[str, ...]:
        present = {c for c, _ in self.layers}
        return tuple(c for c in PEFT_COMPONENTS if c in present)

    def delta(self, target: Target, scale: float = 1.0) -> Tensor:
        """ΔW · scale for one weight: fp32, exactly the parameter's shape."""
        return scale * self.layers[target].delta()

    def deltas(self, scale: float = 1.0) -> dict[Target, Tensor]:
        return {t: self.delta(t, scale) for t in self.layers}

    def describe(self) -> str:
        """'LoRA: 140 weights (unet 128, text_encoder 12)'."""
        kinds = "/".join(dict.fromkeys(kind(layer) for layer in self.layers.values()))
        per = ", ".join(f"{c} {sum(1 for t in self.layers if t[0] == c)}" for c in self.components)
        return f"{kinds}: {len(self.layers)} weights ({per})"


def parse_adapter(path: Path | str, weights: Weights, *, allow_pickle: bool = False) -> Adapter:
    """Read a LoRA / LoCon / LoHa / LoKr file and match it to `weights` (see `names.weights_for`);
    raises SdtrtError, naming the keys, for anything it cannot apply in full."""
    path = Path(path)
    tensors, metadata = read_file(path, allow_pickle)
    tensors = state_dict(path, tensors)
    bad = non_finite(tensors)
    if bad:
        raise SdtrtError(f"{path.name}: {len(bad)} tensors hold NaN or infinite values: {listing(bad)}.",
                         "the file is damaged or its training diverged: use another checkpoint of it")
    groups, unmatched = group_by_target(tensors, weights)
    if unmatched:
        raise unmatched_error(path, unmatched, len(tensors), weights)
    config = peft_config(path, metadata)
    layers: dict[Target, Layer] = {}
    problems: list[str] = []
    for target, parts in groups.items():
        alpha, rslora = peft_alpha(config, target)
        try:
            layers[target] = layer({p: t for p, (_, t) in parts.items()}, weights[target[0]][target[1]], alpha, rslora)
        except Unfit as e:
            problems.append(f"{first_key(parts)}: {e}")
    if problems:
        raise SdtrtError(f"{path.name}: {len(problems)} of its {len(groups)} layers cannot be applied to this model: "
                         f"{listing(problems, 3)}.",
                         "use an adapter made for this model in a supported format (kohya or peft LoRA, LoCon, "
                         "LoHa or LoKr without Tucker cores or DoRA)")
    return Adapter(path, file_sha256(path), layers)


def state_dict(path: Path, obj: Any) -> dict[str, Tensor]:
    if not isinstance(obj, dict) or not obj:
        what = "an empty dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise SdtrtError(f"{path.name} holds {what}, not adapter weights{embedding_hint(obj)}.", FIX_FORMAT)
    others = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if others:
        raise SdtrtError(f"{path.name} is not a flat adapter state dict: {listing([str(k) for k in others])} "
                         f"are not tensors{embedding_hint(obj)}.", FIX_FORMAT)
    return obj


def embedding_hint(obj: Any) -> str:
    looks = isinstance(obj, Tensor) or isinstance(obj, dict) and (set(obj) & EMBEDDING_KEYS or len(obj) == 1)
    return " (it looks like a textual inversion embedding: load it as an embedding)" if looks else ""


def group_by_target(tensors: dict[str, Tensor], weights: Weights) -> tuple[dict[Target, dict[str, tuple[str, Tensor]]], list[str]]:
    """{target: {part: (key, tensor)}} and the keys that name no weight of the model."""
    kohya = {c: kohya_names(c, params) for c, params in weights.items()}
    groups: dict[Target, dict[str, tuple[str, Tensor]]] = {}
    unmatched = []
    for key, tensor in tensors.items():
        found = kohya_target(key, kohya) or peft_target(key, weights)
        if found is None:
            unmatched.append(key)
            continue
        target, part = found
        parts = groups.setdefault(target, {})
        if part in parts:
            raise SdtrtError(f"{key} and {parts[part][0]} both set {part} of {target[0]}'s {target[1]}.",
                             "the file mixes two adapters (or two naming schemes for one): keep one of them")
        parts[part] = (key, tensor)
    return groups, unmatched


def kohya_target(key: str, kohya: Mapping[str, Mapping[str, str]]) -> tuple[Target, str] | None:
    name, _, part = key.partition(".")
    for prefix, component in KOHYA_PREFIXES.items():
        if name.startswith(prefix):
            param = kohya.get(component, {}).get(name[len(prefix):])
            return ((component, param), part) if param else None
    return None


def peft_target(key: str, weights: Weights) -> tuple[Target, str] | None:
    component, _, rest = key.partition(".")
    if component not in PEFT_COMPONENTS:
        return None
    old = OLD_ATTENTION.match(rest)
    if old:
        proj = OLD_PROJ["unet" if component == "unet" else "text"][old[2]]
        module, part = f"{old[1]}.{proj}", f"lora_{old[3]}.weight"
    else:
        suffix = next((s for s in PEFT_PARTS if rest.endswith(s)), None)
        if suffix is None:
            return None
        module, part = rest[: -len(suffix)], PEFT_PARTS[suffix]
    param = module.replace(".base_layer", "") + ".weight"
    return ((component, param), part) if param in weights.get(component, {}) else None


def unmatched_error(path: Path, keys: list[str], total: int, weights: Weights) -> SdtrtError:
    components = ", ".join(weights) or "none"
    if len(keys) == total and (set(keys) & EMBEDDING_KEYS or total == 1):
        guess = "It looks like a textual inversion embedding: load it as an embedding."
    else:
        guess = "Is it an adapter for another architecture (an SD 1.x LoRA on SDXL, or the reverse), a full checkpoint, or an unsupported format?"
    return SdtrtError(f"{path.name}: {len(keys)} of its {total} keys match no weight of this model ({components}): "
                      f"{listing(keys)}. {guess}", "use an adapter trained for this model's architecture, in kohya, peft or LyCORIS format")


def first_key(parts: dict[str, tuple[str, Tensor]]) -> str:
    return min(key for key, _ in parts.values())


# --- peft metadata -------------------------------------------------------------------------------


def peft_config(path: Path, metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """component -> its LoraConfig fields, from diffusers' `lora_adapter_metadata` ("unet.lora_alpha": 8, ...)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SdtrtError(f"{path.name}: its lora_adapter_metadata is not valid JSON ({e}).", "re-save the adapter") from None
    config: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        config.setdefault(component, {})[field] = value
    dora = [c for c, fields in config.items() if fields.get("use_dora")]
    if dora:
        raise SdtrtError(f"{path.name} is a DoRA adapter (use_dora in its metadata for {', '.join(dora)}); DoRA is not supported.",
                         "use a plain LoRA export of it")
    return config


def peft_alpha(config: Mapping[str, Mapping[str, Any]], target: Target) -> tuple[float | None, bool]:
    """(alpha, use_rslora) for one weight, as peft's LoraConfig resolves it (alpha_pattern first)."""
    fields = config.get(target[0])
    if not fields:
        return None, False
    module = target[1].removesuffix(".weight")
    alpha = fields.get("lora_alpha")
    for pattern, value in (fields.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return (None if alpha is None else float(alpha)), bool(fields.get("use_rslora"))
