"""Gaussian noise drawn exactly as diffusers draws it, so that seeds reproduce diffusers' images."""

from __future__ import annotations

from typing import Sequence

import torch

Generator = torch.Generator | Sequence[torch.Generator] | None


def randn(shape: Sequence[int], generator: Generator = None, device: torch.device | str | None = None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`.

    Drawn on the generator's device and then moved (a CPU generator gives the same numbers whatever
    the target device). A list of generators draws one batch row from each, in order.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    gens = list(generator) if isinstance(generator, (list, tuple)) else generator
    if isinstance(gens, list) and len(gens) == 1:
        gens = gens[0]
    if isinstance(gens, list):
        if len(gens) != shape[0]:
            raise ValueError(f"got {len(gens)} generators for a batch of {shape[0]}: pass one generator per image, or one in all")
        rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in gens]
        return torch.cat(rows).to(device)
    draw_on = gens.device if gens is not None else device
    return torch.randn(tuple(shape), generator=gens, device=draw_on, dtype=dtype).to(device)
