"""Euler (Karras et al., 2022, "Elucidating the Design Space...", Algorithm 2 with optional churn).

d = (x - x0(x, sigma_hat)) / sigma_hat;  x_next = x + d (sigma_next - sigma_hat)
with sigma_hat = sigma (1 + gamma), gamma = min(s_churn / N, sqrt(2) - 1) inside [s_tmin, s_tmax].
"""

from __future__ import annotations

import dataclasses

import torch

from ..noise import randn
from .base import SigmaScheduler
from .common import (F32, BaseConfig, float_timesteps, input_divisors, interp, karras_sigmas,
                     refuse, sigma_to_t, sigma_x0, train_sigmas)


@dataclasses.dataclass
class Config(BaseConfig):
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"  # zero | sigma_min
    rescale_betas_zero_snr: bool = False
    timestep_type: str = "discrete"
    # step() options in diffusers; config here. s_churn > 0 makes the sampler stochastic.
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0


def sigma_schedule(cfg: BaseConfig, n: int, ac: torch.Tensor, karras: bool,
                   sigma_min: float | None = None, sigma_max: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps float32, sigmas float64 without the final entry) for the sigma-based samplers."""
    timesteps = float_timesteps(cfg, n)
    base = train_sigmas(ac)
    sigmas = interp(timesteps, base)
    if karras:
        lo = sigma_min if sigma_min is not None else sigmas[-1].item()
        hi = sigma_max if sigma_max is not None else sigmas[0].item()
        sigmas = karras_sigmas(lo, hi, n)
        timesteps = sigma_to_t(sigmas, torch.log(base)).to(F32)
    return timesteps, sigmas


class Euler(SigmaScheduler):
    name = "euler"
    Config = Config

    def __init__(self, config: Config):
        super().__init__(config)
        if config.interpolation_type != "linear" or config.timestep_type != "discrete":
            raise refuse(self.name, "log_linear interpolation or continuous timesteps", "use interpolation_type=linear, timestep_type=discrete")
        self.stochastic = config.s_churn > 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        cfg = self.config
        self.timesteps, sigmas = sigma_schedule(cfg, num_inference_steps, self.alphas_cumprod, cfg.use_karras_sigmas,
                                                cfg.sigma_min, cfg.sigma_max)
        ac0 = self.alphas_cumprod[0]
        last = ((1 - ac0) / ac0) ** 0.5 if cfg.final_sigmas_type == "sigma_min" else torch.tensor(0.0)
        self.sigmas = torch.cat([sigmas, last.reshape(1).double()]).to(F32)
        self.divisors = input_divisors(self.sigmas[:-1])
        self.dts = [nxt - cur for cur, nxt in zip(self.sigmas[:-1].unbind(), self.sigmas[1:].unbind())]
        self.step_index = 0

    def step(self, model_output, timestep, sample, generator=None):
        cfg = self.config
        i = self.step_index
        sample = sample.to(F32)
        sigma = self.sigmas[i]
        dt = self.dts[i]
        sigma_hat = sigma
        if cfg.s_churn > 0:  # "churn": raise the noise level to sigma_hat with fresh noise first
            gamma = min(cfg.s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if cfg.s_tmin <= sigma <= cfg.s_tmax else 0.0
            sigma_hat = sigma * (gamma + 1)
            if gamma > 0:
                eps = randn(model_output.shape, generator, model_output.device, model_output.dtype) * cfg.s_noise
                sample = sample + eps * (sigma_hat**2 - sigma**2) ** 0.5
            dt = self.sigmas[i + 1] - sigma_hat
        if cfg.prediction_type == "epsilon":
            x0 = sample - sigma_hat * model_output
        else:
            x0 = sigma_x0(cfg.prediction_type, model_output, sample, sigma)
        derivative = (sample - x0) / sigma_hat
        prev = sample + derivative * dt
        self.step_index += 1
        return prev.to(model_output.dtype)
