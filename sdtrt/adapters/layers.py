"""The math of each adapter kind: one layer's ΔW from its factors, in fp32, shaped like the weight.

`scale` on a layer is the file's own multiplier (alpha / rank; 1 without alpha); the user's
strength multiplies on top (`Adapter.deltas(scale)`). Conv weights are [out, in, k, k]; factors
multiply as matrices over the flattened [out, in·k·k] and the product is reshaped.

  LoRA / LoCon  ΔW = scale · up @ down              (kohya lora_up/lora_down = peft lora_B/lora_A;
                                                      conv: down a k×k conv [r,in,k,k], up 1×1 [out,r,1,1])
  LoHa          ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b)          rank = w1b.shape[0]
  LoKr          ΔW = scale · w1 ⊗ w2, each given whole or as a @ b   rank = the factored one's b.shape[0]

`layer(parts, shape, alpha)` builds the layer from a module's tensors (named the kohya/LyCORIS way:
"lora_down.weight", "alpha", "hada_w1_a", ...), checking every shape against the weight's, and
raises `Unfit` naming the problem; the caller gathers these into one error.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

LORA = {"lora_down.weight", "lora_up.weight"}
LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
LOKR = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}
REFUSED = {
    "dora_scale": "a DoRA magnitude vector (DoRA is not supported)",
    "lora_magnitude_vector": "a DoRA magnitude vector (DoRA is not supported)",
    "lora_mid.weight": "a LoCon Tucker core (lora_mid; Tucker-decomposed convs are not supported)",
    "hada_t1": "a LoHa Tucker core (hada_t1; Tucker-decomposed convs are not supported)",
    "hada_t2": "a LoHa Tucker core (hada_t2; Tucker-decomposed convs are not supported)",
    "lokr_t1": "a LoKr Tucker core (lokr_t1; Tucker-decomposed convs are not supported)",
    "lokr_t2": "a LoKr Tucker core (lokr_t2; Tucker-decomposed convs are not supported)",
    "lora_up.bias": "a LoRA bias (lora_B.bias; bias adapters are not supported)",
}


class Unfit(Exception):
    """One module's tensors cannot be applied to the model (the message names the keys and why)."""


@dataclasses.dataclass(frozen=True, repr=False)
class LoRA:
    up: Tensor  # [out, r] or [out, r, 1, 1]
    down: Tensor  # [r, in] or [r, in, k, k]
    scale: float
    shape: tuple[int, ...]

    def delta(self) -> Tensor:
        return self.scale * (self.up.flatten(1).float() @ self.down.flatten(1).float()).reshape(self.shape)


@dataclasses.dataclass(frozen=True, repr=False)
class LoHa:
    w1a: Tensor  # [out, r]
    w1b: Tensor  # [r, in·k·k]
    w2a: Tensor
    w2b: Tensor
    scale: float
    shape: tuple[int, ...]

    def delta(self) -> Tensor:
        w1 = self.w1a.float() @ self.w1b.flatten(1).float()
        w2 = self.w2a.float() @ self.w2b.flatten(1).float()
        return self.scale * (w1 * w2).reshape(self.shape)


@dataclasses.dataclass(frozen=True, repr=False)
class LoKr:
    w1: Tensor  # [a, b]
    w2: Tensor  # [c, d] or [c, d·k·k]: ΔW = w1 ⊗ w2 is [a·c, b·d·k·k], reshaped to [out, in, k, k]
    scale: float
    shape: tuple[int, ...]

    def delta(self) -> Tensor:
        return self.scale * torch.kron(self.w1.float(), self.w2.flatten(1).float()).reshape(self.shape)


Layer = LoRA | LoHa | LoKr


def kind(layer: Layer) -> str:
    return type(layer).__name__


def layer(parts: dict[str, Tensor], shape: tuple[int, ...], alpha: float | None = None, rslora: bool = False) -> Layer:
    """The layer these tensors describe for a weight of `shape`. `alpha` applies where the file has no
    alpha tensor for the module (peft metadata); `rslora` divides by √rank instead of rank (peft)."""
    names = set(parts)
    for name in sorted(names):
        if name in REFUSED:
            raise Unfit(f"{name} is {REFUSED[name]}")
    unknown = sorted(names - LORA - LOHA - LOKR - {"alpha"})
    if unknown:
        raise Unfit(f"unknown tensor {', '.join(unknown)} (supported: LoRA/LoCon lora_down/lora_up, "
                    "LoHa hada_w*, LoKr lokr_w*, alpha)")
    if "alpha" in parts:
        alpha = scalar(parts["alpha"]) or None  # 0 means "not set" (sd-scripts, A1111): alpha = rank
    if names & LORA:
        return lora(parts, shape, alpha, rslora, names - LORA - {"alpha"})
    if names & LOHA:
        return loha(parts, shape, alpha, names - LOHA - {"alpha"})
    if names & LOKR:
        return lokr(parts, shape, alpha, names - LOKR - {"alpha"})
    raise Unfit("an alpha without any weights")


def lora(parts, shape, alpha, rslora, others) -> LoRA:
    mixed(others)
    missing(parts, LORA)
    up, down = parts["lora_up.weight"], parts["lora_down.weight"]
    if up.dim() not in (2, 4) or down.dim() not in (2, 4) or up.shape[1] != down.shape[0]:
        raise Unfit(f"lora_up {list(up.shape)} and lora_down {list(down.shape)} do not multiply (rank mismatch)")
    if down.dim() == 4 and (len(shape) != 4 or down.shape[2:] != shape[2:]) or up.dim() == 4 and up.shape[2:] != (1, 1):
        raise Unfit(f"lora_up {list(up.shape)} @ lora_down {list(down.shape)} does not fit the weight {list(shape)}")
    fits(up.shape[0], down.flatten(1).shape[1], shape, f"lora_up {list(up.shape)} @ lora_down {list(down.shape)}")
    rank = down.shape[0]
    return LoRA(up, down, 1.0 if alpha is None else alpha / (math.sqrt(rank) if rslora else rank), shape)


def loha(parts, shape, alpha, others) -> LoHa:
    mixed(others)
    missing(parts, LOHA)
    w1a, w1b, w2a, w2b = (parts[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    for a, b, n in ((w1a, w1b, "1"), (w2a, w2b, "2")):
        if a.dim() != 2 or a.shape[1] != b.shape[0]:
            raise Unfit(f"hada_w{n}_a {list(a.shape)} and hada_w{n}_b {list(b.shape)} do not multiply (rank mismatch)")
        fits(a.shape[0], b.flatten(1).shape[1], shape, f"hada_w{n}_a {list(a.shape)} @ hada_w{n}_b {list(b.shape)}")
    return LoHa(w1a, w1b, w2a, w2b, 1.0 if alpha is None else alpha / w1b.shape[0], shape)


def lokr(parts, shape, alpha, others) -> LoKr:
    mixed(others)
    w1, rank1 = kron_factor(parts, "1")
    w2, rank2 = kron_factor(parts, "2")
    if w1.dim() != 2:
        raise Unfit(f"lokr_w1 is {list(w1.shape)}; it must be a matrix")
    if w2.dim() == 4 and (len(shape) != 4 or w2.shape[2:] != shape[2:]):
        raise Unfit(f"lokr_w2 {list(w2.shape)} does not fit the weight {list(shape)}")
    w2flat = w2.flatten(1)
    fits(w1.shape[0] * w2flat.shape[0], w1.shape[1] * w2flat.shape[1], shape, f"lokr_w1 {list(w1.shape)} ⊗ lokr_w2 {list(w2.shape)}")
    rank = rank1 if rank1 is not None else rank2
    return LoKr(w1, w2, 1.0 if alpha is None or rank is None else alpha / rank, shape)


def kron_factor(parts: dict[str, Tensor], n: str) -> tuple[Tensor, int | None]:
    """lokr_w{n} whole (rank None), or lokr_w{n}_a @ lokr_w{n}_b with the rank b.shape[0]."""
    whole, a, b = parts.get(f"lokr_w{n}"), parts.get(f"lokr_w{n}_a"), parts.get(f"lokr_w{n}_b")
    if whole is not None and a is None and b is None:
        return whole.float(), None
    if whole is None and a is not None and b is not None:
        if a.dim() != 2 or a.shape[1] != b.shape[0]:
            raise Unfit(f"lokr_w{n}_a {list(a.shape)} and lokr_w{n}_b {list(b.shape)} do not multiply (rank mismatch)")
        w = a.float() @ b.flatten(1).float()
        return (w.reshape(a.shape[0], *b.shape[1:]) if b.dim() == 4 else w), b.shape[0]
    raise Unfit(f"LoKr needs lokr_w{n} or both lokr_w{n}_a and lokr_w{n}_b")


def fits(rows: int, cols: int, shape: tuple[int, ...], what: str) -> None:
    if (rows, cols) != (shape[0], math.prod(shape[1:])):
        raise Unfit(f"{what} gives ΔW [{rows}, {cols}] but the weight is {list(shape)} (wrong rank or another architecture)")


def missing(parts: dict[str, Tensor], needed: set[str]) -> None:
    absent = sorted(needed - set(parts))
    if absent:
        raise Unfit(f"{', '.join(absent)} is missing")


def mixed(others: set[str]) -> None:
    if others:
        raise Unfit(f"tensors of different adapter kinds on one module ({', '.join(sorted(others))})")


def scalar(t: Tensor) -> float:
    if t.numel() != 1:
        raise Unfit(f"alpha must be a single number, not a {list(t.shape)} tensor")
    return float(t.float().item())
