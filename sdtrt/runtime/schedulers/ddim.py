"""DDIM (Song et al., 2021, "Denoising Diffusion Implicit Models").

x_{t-1} = sqrt(a_{t-1}) x0 + sqrt(1 - a_{t-1} - s_t^2) eps + s_t z          (eq. 12)
s_t     = eta sqrt((1 - a_{t-1}) / (1 - a_t)) sqrt(1 - a_t / a_{t-1})        (eq. 16)

The scalar coefficients of every step are computed once in set_timesteps (same float32 operations
diffusers performs per step, so results are identical), leaving only tensor work in step().
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from ..noise import randn
from .base import Scheduler
from .common import (F64, BaseConfig, ThresholdingConfig, alphas_cumprod, arange_down, dynamically_thresholded, linspace,
                     noised_by_alpha, x0_and_eps)


@dataclasses.dataclass
class Config(ThresholdingConfig, BaseConfig):
    timestep_spacing: str = "leading"
    clip_sample: bool = True  # ignored when thresholding is on (diffusers: thresholding first)
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    rescale_betas_zero_snr: bool = False
    eta: float = 0.0  # 0: deterministic DDIM; 1: DDPM-like. diffusers passes it to step(); here it is config.


class Coefficients(NamedTuple):
    sqrt_a: torch.Tensor  # sqrt(a_t)
    sqrt_b: torch.Tensor  # sqrt(1 - a_t)
    x0: torch.Tensor  # sqrt(a_{t-1})
    eps: torch.Tensor  # sqrt(1 - a_{t-1} - s_t^2)
    std: torch.Tensor  # s_t


def discrete_timesteps(cfg: BaseConfig, n: int) -> torch.Tensor:
    """Integer timesteps, descending, for the alpha-based samplers (DDIM, PNDM): float64 values."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return linspace(0, T - 1, n).round().flip(0)
    if cfg.timestep_spacing == "leading":
        return (torch.arange(n, dtype=F64) * (T // n)).flip(0) + cfg.steps_offset
    return arange_down(T, T / n).round() - 1


class DDIM(Scheduler):
    name = "ddim"
    Config = Config

    def __init__(self, config: Config):
        super().__init__(config)
        self.alphas_cumprod = alphas_cumprod(config, config.rescale_betas_zero_snr)
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]
        self.stochastic = config.eta > 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = discrete_timesteps(self.config, num_inference_steps).long()
        self.step_index = 0
        self.plan = [self._coefficients(int(t)) for t in self.timesteps]

    def _coefficients(self, t: int) -> Coefficients:
        cfg = self.config
        # diffusers steps back by T // n whatever the spacing; kept for parity
        prev_t = t - cfg.num_train_timesteps // self.num_inference_steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        std = cfg.eta * variance**0.5
        return Coefficients(a_t**0.5, (1 - a_t) ** 0.5, a_prev**0.5, (1 - a_prev - std**2) ** 0.5, std)

    def step(self, model_output, timestep, sample, generator=None):
        cfg, c = self.config, self.plan[self.step_index]
        x0, eps = x0_and_eps(cfg.prediction_type, model_output, sample, c.sqrt_a, c.sqrt_b)
        if cfg.thresholding:
            x0 = dynamically_thresholded(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        elif cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        prev = c.x0 * x0 + c.eps * eps
        if cfg.eta > 0:
            prev = prev + c.std * randn(model_output.shape, generator, model_output.device, model_output.dtype)
        self.step_index += 1
        return prev

    def add_noise(self, original, noise):
        return noised_by_alpha(self.alphas_cumprod[int(self.timesteps[self.step_index])], original, noise)
