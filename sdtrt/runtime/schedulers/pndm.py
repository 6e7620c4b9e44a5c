"""PLMS: pseudo linear multi-step (Liu et al., 2022, "Pseudo Numerical Methods for Diffusion Models").

Linear multi-step over the last four eps estimates (Adams-Bashforth coefficients), with the
transfer step of eq. 11. The first step is a two-evaluation Heun-like warm-up, which is why the
schedule repeats the second timestep (skip_prk_steps mode, the one Stable Diffusion ships with).
"""

from __future__ import annotations

import dataclasses

import torch

from .base import Scheduler
from .common import BaseConfig, alphas_cumprod, refuse
from .ddim import discrete_timesteps


@dataclasses.dataclass
class Config(BaseConfig):
    timestep_spacing: str = "leading"
    skip_prk_steps: bool = False
    set_alpha_to_one: bool = False


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
        cfg = self.config
        base = discrete_timesteps(cfg, num_inference_steps).flip(0).long()  # ascending
        # ascending t_0..t_{n-1} -> t_{n-1}, t_{n-2}, t_{n-2}, ..., t_0 (the second timestep twice)
        self.timesteps = torch.cat([base[:-1], base[-2:-1], base[-1:]]).flip(0)
        self.step_index = 0
        self.ets: list[torch.Tensor] = []  # eps history, newest last
        self.warmup_sample: torch.Tensor | None = None

    def _transfer(self, sample, t: int, prev_t: int, eps):
        """eq. 11: x_{t-d} from x_t and an eps estimate."""
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        if self.config.prediction_type == "v_prediction":
            eps = a_t**0.5 * eps + b_t**0.5 * sample
        sample_coeff = (a_prev / a_t) ** 0.5
        denom = a_t * b_prev**0.5 + (a_t * b_t * a_prev) ** 0.5
        return sample_coeff * sample - (a_prev - a_t) * eps / denom

    def step(self, model_output, timestep, sample, generator=None):
        i = self.step_index
        t = int(self.timesteps[i])
        ratio = self.config.num_train_timesteps // self.num_inference_steps
        prev_t = t - ratio
        if i == 1:  # second evaluation of the warm-up: average eps at t and t - ratio, restart from x_t
            prev_t, t = t, t + ratio
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
        return self._transfer(sample, t, prev_t, eps)
