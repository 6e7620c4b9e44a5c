"""Test helpers: image comparison and the diffusers oracle set up like sdtrt."""

from __future__ import annotations

import numpy as np
import torch


def psnr(a, b) -> float:
    """PSNR in dB between two uint8 images (PIL or arrays); inf when identical."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def reference_pipeline(model_dir, scheduler: str | None = None, cls_name: str = "StableDiffusionPipeline", **scheduler_overrides):
    """diffusers' pipeline on the same folder, with the diffusers scheduler sdtrt's `scheduler` name maps to."""
    import diffusers

    from sdtrt.runtime import schedulers as S

    pipe = getattr(diffusers, cls_name).from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        cls = getattr(diffusers, S.diffusers_class_name(scheduler))
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **S.implied_overrides(scheduler), **scheduler_overrides)
    return pipe


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)
