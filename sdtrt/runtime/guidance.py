"""Classifier-free guidance (Ho & Salimans, 2022) and guidance rescale (Lin et al., 2024, eq. 15-16)."""

from __future__ import annotations

import torch


def guided(noise: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a [uncond; cond] UNet output and combine: uncond + scale (cond - uncond). Returns (guided, cond)."""
    uncond, cond = noise.chunk(2)
    return uncond + scale * (cond - uncond), cond


def rescaled(guided_noise: torch.Tensor, cond: torch.Tensor, rescale: float) -> torch.Tensor:
    """Blend toward the guided prediction rescaled to the conditional prediction's per-sample std."""
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided_noise.std(dim=dims, keepdim=True)
    return rescale * (guided_noise * (std_cond / std_guided)) + (1 - rescale) * guided_noise
