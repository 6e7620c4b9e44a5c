"""Heun (Karras et al., 2022, Algorithm 1): Euler predictor, trapezoidal corrector.

Each step costs two model evaluations, so `timesteps` lists every timestep after the first twice:
the first visit predicts x' = x + d (sigma_next - sigma), the second corrects with the mean of d and d'.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import SigmaScheduler
from .common import F32, BaseConfig, input_divisors, sigma_x0
from .euler import sigma_schedule


@dataclasses.dataclass
class Config(BaseConfig):
    beta_start: float = 0.00085
    beta_end: float = 0.012
    use_karras_sigmas: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0


class Heun(SigmaScheduler):
    name = "heun"
    Config = Config
    order = 2

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        timesteps, sigmas = sigma_schedule(self.config, num_inference_steps, self.alphas_cumprod, self.config.use_karras_sigmas)
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(F32)
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        self.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        self.divisors = input_divisors(self.sigmas[:-1])
        self.step_index = 0
        self.pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (d, dt, x) after a predictor step

    def step(self, model_output, timestep, sample, generator=None):
        cfg, i = self.config, self.step_index
        predictor = self.pending is None
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if predictor else (self.sigmas[i - 1], self.sigmas[i])
        x0 = sigma_x0(cfg.prediction_type, model_output, sample, sigma if predictor else sigma_next)
        if cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        if predictor:
            d = (sample - x0) / sigma
            dt = sigma_next - sigma
            self.pending = (d, dt, sample)
        else:
            d_first, dt, start = self.pending
            d = (d_first + (sample - x0) / sigma_next) / 2
            sample, self.pending = start, None
        self.step_index += 1
        return sample + d * dt
