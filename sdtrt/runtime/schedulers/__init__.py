"""Schedulers, one file each, torch only. `make(name, config)` builds one from a diffusers
scheduler_config.json dict plus overrides; the numbers match diffusers' scheduler of that name.

Names accepted (case and punctuation do not matter): ours, diffusers' class names, and the
A1111 sampler names.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from ...errors import SdtrtError
from .base import Scheduler
from .common import THRESHOLDING_FIELDS, ThresholdingConfig, config_from
from .ddim import DDIM
from .dpmpp_2m import DPMSolverPP
from .euler import Euler
from .euler_ancestral import EulerAncestral
from .heun import Heun
from .lcm import LCM
from .lms import LMS
from .pndm import PNDM
from .unipc import UniPC

# name -> (class, overrides the name implies)
SCHEDULERS: dict[str, tuple[type[Scheduler], dict[str, Any]]] = {
    "ddim": (DDIM, {}),
    "pndm": (PNDM, {"skip_prk_steps": True}),
    "euler": (Euler, {}),
    "euler_karras": (Euler, {"use_karras_sigmas": True}),
    "euler_ancestral": (EulerAncestral, {}),
    "lms": (LMS, {}),
    "lms_karras": (LMS, {"use_karras_sigmas": True}),
    "heun": (Heun, {}),
    "dpmpp_2m": (DPMSolverPP, {}),
    "dpmpp_2m_karras": (DPMSolverPP, {"use_karras_sigmas": True}),
    "dpmpp_2m_sde": (DPMSolverPP, {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_2m_sde_karras": (DPMSolverPP, {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
    "unipc": (UniPC, {}),
    "lcm": (LCM, {}),
}

ALIASES: dict[str, str] = {
    # diffusers class names
    "ddimscheduler": "ddim",
    "pndmscheduler": "pndm",
    "eulerdiscretescheduler": "euler",
    "eulerancestraldiscretescheduler": "euler_ancestral",
    "lmsdiscretescheduler": "lms",
    "heundiscretescheduler": "heun",
    "dpmsolvermultistepscheduler": "dpmpp_2m",
    "unipcmultistepscheduler": "unipc",
    "lcmscheduler": "lcm",
    # A1111 names (after normalisation: "DPM++ 2M Karras" -> "dpmpp_2m_karras")
    "plms": "pndm",
    "euler_a": "euler_ancestral",
}


DISPLAY_NAMES = {  # A1111's names, written into PNG parameters so other tools read them back
    "ddim": "DDIM", "pndm": "PLMS", "euler": "Euler", "euler_karras": "Euler Karras", "euler_ancestral": "Euler a",
    "lms": "LMS", "lms_karras": "LMS Karras", "heun": "Heun", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_karras": "DPM++ 2M SDE Karras", "unipc": "UniPC", "lcm": "LCM",
}


def display_name(name: str) -> str:
    return DISPLAY_NAMES[resolve(name)]


def normalize(name: str) -> str:
    key = name.strip().lower().replace("++", "pp")
    return re.sub(r"[^a-z0-9]+", "_", key).strip("_")


def resolve(name: str) -> str:
    """Our canonical name for any accepted spelling."""
    key = normalize(name)
    key = ALIASES.get(key.replace("_", ""), ALIASES.get(key, key))
    if key not in SCHEDULERS:
        raise SdtrtError(f"unknown scheduler {name!r}.",
                         f"choose one of: {', '.join(SCHEDULERS)} (diffusers class names and A1111 names such as 'Euler a' and 'DPM++ 2M Karras' work too)")
    return key


def make(name: str, config: Mapping[str, Any] | None = None, **overrides: Any) -> Scheduler:
    """A scheduler configured from a model's scheduler_config.json (`config`) plus overrides."""
    key = resolve(name)
    cls, implied = SCHEDULERS[key]
    _refuse_missing_thresholding(key, cls, overrides)
    cfg = config_from(cls.Config, config or {}, {**implied, **overrides}, key)
    return cls(cfg)


def with_thresholding() -> list[str]:
    """The schedulers that have dynamic thresholding (as their diffusers classes do)."""
    return [k for k, (cls, _) in SCHEDULERS.items() if issubclass(cls.Config, ThresholdingConfig)]


def _refuse_missing_thresholding(key: str, cls: type[Scheduler], overrides: Mapping[str, Any]) -> None:
    """Thresholding options asked of a scheduler whose diffusers class has none: say so, and which have it.
    (A model's scheduler_config.json may carry them for any class; diffusers ignores them there, and so do we.)"""
    asked = [k for k in THRESHOLDING_FIELDS if k in overrides]
    if not asked or issubclass(cls.Config, ThresholdingConfig):
        return
    have = ", ".join(with_thresholding())
    given = ", ".join(f"{k}={overrides[k]!r}" for k in asked)
    raise SdtrtError(f"scheduler '{key}' has no dynamic thresholding ({given}): "
                     f"diffusers' {diffusers_class_name(key)} has no such option.",
                     f"use a scheduler that has it ({have}), or drop {', '.join(asked)}",
                     cli_fix=f"pass --scheduler with one that has it ({have}), or drop --scheduler-option {asked[0]}")


def diffusers_class_name(name: str) -> str:
    """The diffusers class that `name` corresponds to (for benchmarks and parity tests)."""
    cls = SCHEDULERS[resolve(name)][0]
    return {DDIM: "DDIMScheduler", PNDM: "PNDMScheduler", Euler: "EulerDiscreteScheduler",
            EulerAncestral: "EulerAncestralDiscreteScheduler", LMS: "LMSDiscreteScheduler", Heun: "HeunDiscreteScheduler",
            DPMSolverPP: "DPMSolverMultistepScheduler", UniPC: "UniPCMultistepScheduler", LCM: "LCMScheduler"}[cls]


def implied_overrides(name: str) -> dict[str, Any]:
    return dict(SCHEDULERS[resolve(name)][1])


__all__ = ["Scheduler", "SCHEDULERS", "make", "resolve", "display_name", "diffusers_class_name", "implied_overrides", "with_thresholding"]
