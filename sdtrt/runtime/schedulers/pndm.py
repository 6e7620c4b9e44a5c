"""PLMS: pseudo linear multi-step (Liu et al., 2022, "Pseudo Numerical Methods for Diffusion Models").

Linear multi-step over the last four eps estimates (Adams-Bashforth coefficients), with the
transfer step of eq. 11. The first step is a two-evaluation Heun-like warm-up, which is why the
schedule repeats the second timestep (skip_prk_steps mode, the one Stable Diffusion ships with).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from .base import Scheduler
from .common import BaseConfig, alphas_cumprod, noised_by_alpha, refuse
from .ddim import discrete_timesteps


@dataclasses.dataclass
class Config(BaseConfig):
    timestep_spacing: str = "leading"
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False


class Transfer(NamedTuple):
    """eq. 11 from t to t': x' = sample_coeff x - (a' - a) eps / denom (v-prediction: eps = v_a v + v_b x)."""

    sample_coeff: torch.Tensor
    diff: torch.Tensor
    denom: torch.Tensor
    v_a: torch.Tensor
    v_b: torch.Tensor


class PNDM(Scheduler):
    name = "pndm"
    Config = Config

    def __init__(self, config: Config):
        super().__init__(config)
        if not config.skip_prk_steps:
            raise refuse(self.name, "the Runge-Kutta warm-up (skip_prk_steps=False)", "pass skip_prk_steps=True (Stable Diffusion's setting)")
        if config.prediction_type not in ("epsilon", "v_prediction"):
            raise refuse(self.name, f"prediction_type={config.prediction_type}", "use epsilon or v_prediction")
        self.alphas_cumprod = alphas_cumprod(config)
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        base = discrete_timesteps(self.config, num_inference_steps).flip(0).long()  # ascending
        # ascending t_0..t_{n-1} -> t_{n-1}, t_{n-2}, t_{n-2}, ..., t_0 (the second timestep twice)
        self.timesteps = torch.cat([base[:-1], base[-2:-1], base[-1:]]).flip(0)
        self._start(self.timesteps)

    def _start(self, timesteps: torch.Tensor) -> None:
        """PLMS counts its warm-up from wherever it starts, so a late start re-plans the rest."""
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        # step 1 re-runs the warm-up from the first timestep: it transfers from t + ratio to t
        pairs = [(int(t) + ratio, int(t)) if i == 1 else (int(t), int(t) - ratio) for i, t in enumerate(timesteps)]
        self.active = timesteps
        self.plan = [self._transfer_coefficients(t, prev) for t, prev in pairs]
        self.step_index = 0
        self.ets: list[torch.Tensor] = []  # eps history, newest last
        self.warmup_sample: torch.Tensor | None = None

    def set_begin_index(self, index: int) -> None:
        # diffusers' PNDM has no begin index: img2img hands it the tail of the schedule and its
        # step counter starts at 0 there, warm-up included. Same here.
        self._start(self.timesteps[index:])

    @property
    def remaining_timesteps(self) -> torch.Tensor:
        return self.active[self.step_index:]

    def add_noise(self, original, noise):
        return noised_by_alpha(self.alphas_cumprod[int(self.active[self.step_index])], original, noise)

    def _transfer_coefficients(self, t: int, prev_t: int) -> Transfer:
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return Transfer((a_prev / a_t) ** 0.5, a_prev - a_t, denom, a_t**0.5, b_t**0.5)

    def step(self, model_output, timestep, sample, generator=None):
        i = self.step_index
        if i == 1:  # second evaluation of the warm-up: average eps at t and t - ratio, restart from x_t
            eps = (model_output + self.ets[-1]) / 2
            sample, self.warmup_sample = self.warmup_sample, None
        else:
            self.ets = self.ets[-3:] + [model_output]
            e = self.ets
            if len(e) == 1:
                eps = model_output
                self.warmup_sample = sample
            elif len(e) == 2:
                eps = (3 * e[-1] - e[-2]) / 2
            elif len(e) == 3:
                eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
            else:
                eps = 1 / 24 * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])
        self.step_index += 1
        c = self.plan[i]
        if self.config.prediction_type == "v_prediction":
            eps = c.v_a * eps + c.v_b * sample
        return c.sample_coeff * sample - c.diff * eps / c.denom
