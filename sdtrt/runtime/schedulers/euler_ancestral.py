"""Euler ancestral (k-diffusion's sample_euler_ancestral; Karras et al. 2022 with eta = 1).

Step to sigma_down with Euler, then add fresh noise of size sigma_up, where
sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2), sigma_down = sqrt(sigma_next^2 - sigma_up^2).
"""

from __future__ import annotations

import dataclasses

import torch

from ..noise import randn
from .base import SigmaScheduler
from .common import F32, BaseConfig, input_divisors, refuse, sigma_x0
from .euler import sigma_schedule


@dataclasses.dataclass
class Config(BaseConfig):
    rescale_betas_zero_snr: bool = False


class EulerAncestral(SigmaScheduler):
    name = "euler_ancestral"
    Config = Config
    stochastic = True

    def __init__(self, config: Config):
        super().__init__(config)
        if config.prediction_type == "sample":
            raise refuse(self.name, "prediction_type=sample", "use epsilon or v_prediction")

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        self.timesteps, sigmas = sigma_schedule(self.config, num_inference_steps, self.alphas_cumprod, karras=False)
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(F32)
        self.divisors = input_divisors(self.sigmas[:-1])
        self.plan = [self._up_down(s, s_next) for s, s_next in zip(self.sigmas[:-1].unbind(), self.sigmas[1:].unbind())]
        self.step_index = 0

    @staticmethod
    def _up_down(sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma_up, sigma_down - sigma): the noise to add, and the Euler step to take first."""
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        return sigma_up, sigma_down - sigma

    def step(self, model_output, timestep, sample, generator=None):
        i = self.step_index
        sigma = self.sigmas[i]
        sigma_up, dt = self.plan[i]
        sample = sample.to(F32)
        x0 = sigma_x0(self.config.prediction_type, model_output, sample, sigma)
        derivative = (sample - x0) / sigma
        prev = sample + derivative * dt
        # noise is drawn on every step, the last included (sigma_up = 0 there), as diffusers does
        prev = prev + randn(model_output.shape, generator, model_output.device, model_output.dtype) * sigma_up
        self.step_index += 1
        return prev.to(model_output.dtype)
