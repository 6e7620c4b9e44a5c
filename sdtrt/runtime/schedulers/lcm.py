"""LCM: multistep latent consistency sampling (Luo et al., 2023, Algorithm 1).

Each step maps x_t to a consistency estimate denoised = c_out x0 + c_skip x_t (boundary scalings
with sigma_data = 0.5), then re-noises it to the next timestep with fresh noise (except the last).
Timesteps are picked evenly from the distillation schedule of `original_inference_steps`.
"""

from __future__ import annotations

import dataclasses

import torch

from ...errors import SdtrtError
from ..noise import randn
from .base import Scheduler
from .common import (BaseConfig, ThresholdingConfig, alphas_cumprod, dynamically_thresholded, linspace_open, noised_by_alpha,
                     prediction_to_x0_eps)


@dataclasses.dataclass
class Config(ThresholdingConfig, BaseConfig):
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    timestep_spacing: str = "leading"
    original_inference_steps: int = 50
    clip_sample: bool = False  # ignored when thresholding is on (diffusers: thresholding first)
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    timestep_scaling: float = 10.0
    rescale_betas_zero_snr: bool = False


class LCM(Scheduler):
    name = "lcm"
    Config = Config
    stochastic = True

    def __init__(self, config: Config):
        super().__init__(config)
        self.alphas_cumprod = alphas_cumprod(config, config.rescale_betas_zero_snr)
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        cfg = self.config
        original = cfg.original_inference_steps
        if num_inference_steps > original:
            raise SdtrtError(f"LCM cannot take {num_inference_steps} steps: its distillation schedule has {original}.",
                             f"pass at most {original} steps (LCM is meant for 2-8)")
        k = cfg.num_train_timesteps // original
        origin = (torch.arange(1, original + 1) * k - 1).flip(0)
        picks = linspace_open(0, len(origin), num_inference_steps).floor().long()
        self.timesteps = origin[picks]
        self.num_inference_steps = num_inference_steps
        self.step_index = 0

    def step(self, model_output, timestep, sample, generator=None):
        cfg, i = self.config, self.step_index
        t = self.timesteps[i]
        prev_t = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else t
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        sigma_data = 0.5
        scaled_t = t * cfg.timestep_scaling
        c_skip = sigma_data**2 / (scaled_t**2 + sigma_data**2)
        c_out = scaled_t / (scaled_t**2 + sigma_data**2) ** 0.5
        if cfg.prediction_type == "epsilon":  # sqrt() rather than ** 0.5: the exact ops diffusers uses here
            x0 = (sample - (1 - a_t).sqrt() * model_output) / a_t.sqrt()
        else:
            x0, _ = prediction_to_x0_eps(cfg.prediction_type, model_output, sample, a_t)
        if cfg.thresholding:
            x0 = dynamically_thresholded(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        elif cfg.clip_sample:
            x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        denoised = c_out * x0 + c_skip * sample
        self.step_index += 1
        if i != self.num_inference_steps - 1:
            noise = randn(model_output.shape, generator, model_output.device, denoised.dtype)
            return a_prev.sqrt() * denoised + (1 - a_prev).sqrt() * noise
        return denoised

    def add_noise(self, original, noise):
        return noised_by_alpha(self.alphas_cumprod[int(self.timesteps[self.step_index])], original, noise)
