"""LMS: linear multi-step in sigma (k-diffusion's sample_lms).

x_next = x + sum_j c_j d_{i-j},   c_j = integral from sigma_i to sigma_{i+1} of the Lagrange basis
polynomial through the last `order` sigmas. The polynomial has degree <= 3, so a 4-point
Gauss-Legendre rule integrates it exactly (diffusers calls scipy's quad on the same integrand).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .base import SigmaScheduler
from .common import F32, BaseConfig, input_divisors, sigma_x0
from .euler import sigma_schedule

# 4-point Gauss-Legendre nodes and weights on [-1, 1]
_GL_X = (-0.8611363115940526, -0.3399810435848563, 0.3399810435848563, 0.8611363115940526)
_GL_W = (0.3478548451374538, 0.6521451548625461, 0.6521451548625461, 0.3478548451374538)


@dataclasses.dataclass
class Config(BaseConfig):
    use_karras_sigmas: bool = False
    order: int = 4  # a step() argument in diffusers


def lms_coefficient(sigmas: list[float], i: int, order: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis for node sigma_{i-j} among sigma_{i-k}, k < order."""
    def basis(tau: float) -> float:
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return prod

    a, b = sigmas[i], sigmas[i + 1]
    half, mid = (b - a) / 2, (a + b) / 2
    return half * math.fsum(w * basis(mid + half * x) for x, w in zip(_GL_X, _GL_W))


class LMS(SigmaScheduler):
    name = "lms"
    Config = Config

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        self.timesteps, sigmas = sigma_schedule(self.config, num_inference_steps, self.alphas_cumprod, self.config.use_karras_sigmas)
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).to(F32)
        self.divisors = input_divisors(self.sigmas[:-1])
        self._sigma_list = self.sigmas.double().tolist()
        self.step_index = 0
        self.derivatives: list[torch.Tensor] = []  # newest last, at most `order`

    def step(self, model_output, timestep, sample, generator=None):
        i = self.step_index
        sigma = self.sigmas[i]
        x0 = sigma_x0(self.config.prediction_type, model_output, sample, sigma)
        self.derivatives = (self.derivatives + [(sample - x0) / sigma])[-self.config.order:]
        order = min(i + 1, self.config.order)
        coeffs = [lms_coefficient(self._sigma_list, i, order, j) for j in range(order)]
        prev = sample + sum(c * d for c, d in zip(coeffs, reversed(self.derivatives)))
        self.step_index += 1
        return prev
