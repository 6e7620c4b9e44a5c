"""DPM-Solver++(2M) and its SDE variant (Lu et al., 2022, "DPM-Solver++", Algorithm 2; SDE: eq. in App. B).

Works in log-SNR: lambda = log(alpha / sigma), h = lambda_next - lambda. With D0 the newest x0
estimate and D1 = (D0 - D_prev) / r (r = h_prev / h):
  ODE, midpoint: x' = (sigma'/sigma) x - alpha' (e^-h - 1) D0 - 1/2 alpha' (e^-h - 1) D1
  SDE:           x' = (sigma'/sigma) e^-h x + alpha' (1 - e^-2h)(D0 + 1/2 D1) + sigma' sqrt(1 - e^-2h) z
The first step (no history) and, by default, the last step are first order.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from ..noise import randn
from .base import Scheduler
from .common import (F32, F64, BaseConfig, ThresholdingConfig, alphas_cumprod_for_sigmas, arange_down, dynamically_thresholded,
                     interp, karras_sigmas, linspace, refuse, sigma_to_t, train_sigmas)


@dataclasses.dataclass
class Config(ThresholdingConfig, BaseConfig):
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"  # or sde-dpmsolver++
    solver_type: str = "midpoint"  # or heun
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"  # zero | sigma_min
    lambda_min_clipped: float = -float("inf")
    rescale_betas_zero_snr: bool = False
    variance_type: str | None = None


def multistep_timesteps(cfg: BaseConfig, n: int, last_timestep: int) -> torch.Tensor:
    """Timesteps for the multistep solvers (n + 1 points, the final one dropped), float64 values."""
    if cfg.timestep_spacing == "linspace":
        return linspace(0, last_timestep - 1, n + 1).round().flip(0)[:-1]
    if cfg.timestep_spacing == "leading":
        return (torch.arange(n + 1, dtype=F64) * (last_timestep // (n + 1))).flip(0)[:-1] + cfg.steps_offset
    return arange_down(last_timestep, cfg.num_train_timesteps / n).round() - 1


def alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VP parametrisation of a Karras sigma: alpha = 1/sqrt(sigma^2+1), sigma_vp = sigma alpha."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def log_snr(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    alpha, s = alpha_sigma(sigma)
    return alpha, s, torch.log(alpha) - torch.log(s)


class Coefficients(NamedTuple):
    """The scalars of one step (computed once per schedule; step() only does tensor work).

    x0 = (x - s_vp * eps) / alpha                               (epsilon prediction)
    first order:  x' = c_x x - c_d0 D0 (+ c_z z for the SDE)
    second order: x' = c_x x - c_d0 D0 - c_d1 D1 (signs as in the paper), D1 = r_inv (D0 - D_prev)
    """

    alpha: torch.Tensor
    s_vp: torch.Tensor
    c_x: torch.Tensor
    c_d0: torch.Tensor
    c_z: torch.Tensor | None
    c_x2: torch.Tensor | None  # second order (None at step 0)
    c_d0_2: torch.Tensor | None
    c_d1: torch.Tensor | None
    r_inv: torch.Tensor | None
    c_z2: torch.Tensor | None


class DPMSolverPP(Scheduler):
    name = "dpmpp_2m"
    Config = Config

    def __init__(self, config: Config):
        super().__init__(config)
        if config.algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
            raise refuse(self.name, f"algorithm_type={config.algorithm_type}", "use dpmsolver++ or sde-dpmsolver++")
        if config.solver_order not in (1, 2):
            raise refuse(self.name, f"solver_order={config.solver_order}", "use solver_order 1 or 2")
        if config.solver_type not in ("midpoint", "heun"):
            raise refuse(self.name, f"solver_type={config.solver_type}", "use midpoint or heun")
        if config.variance_type:
            raise refuse(self.name, f"variance_type={config.variance_type} (learned variance)", "set variance_type=None")
        self.alphas_cumprod = alphas_cumprod_for_sigmas(config, config.rescale_betas_zero_snr)
        self.stochastic = config.algorithm_type == "sde-dpmsolver++"
        self.sigmas = torch.empty(0)

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        cfg, ac, n = self.config, self.alphas_cumprod, num_inference_steps
        lambdas = torch.log(torch.sqrt(ac)) - torch.log(torch.sqrt(1 - ac))
        clipped = int(torch.searchsorted(torch.flip(lambdas, [0]), torch.tensor(cfg.lambda_min_clipped, dtype=lambdas.dtype)))
        timesteps = multistep_timesteps(cfg, n, cfg.num_train_timesteps - clipped)
        base = train_sigmas(ac)
        if cfg.use_karras_sigmas:
            sigmas = karras_sigmas(base[0].item(), base[-1].item(), n)
            timesteps = sigma_to_t(sigmas, torch.log(base))
            if cfg.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = interp(timesteps, base)
        last = ((1 - ac[0]) / ac[0]) ** 0.5 if cfg.final_sigmas_type == "sigma_min" else torch.tensor(0.0)
        self.sigmas = torch.cat([sigmas, last.reshape(1).double()]).to(F32)
        self.timesteps = timesteps.long()
        self.plan = [self._coefficients(i) for i in range(len(self.timesteps))]
        self.step_index = 0
        self.x0_history: list[torch.Tensor] = []  # newest last

    def _coefficients(self, i: int) -> Coefficients:
        sde = self.stochastic
        alpha_s0, sigma_s0, lambda_s0 = log_snr(self.sigmas[i])
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[i + 1])
        h = lambda_t - lambda_s0
        if sde:
            c_x = sigma_t / sigma_s0 * torch.exp(-h)
            c_d0 = -(alpha_t * (1 - torch.exp(-2.0 * h)))  # sign folded: x' = c_x x - c_d0 D0
            c_z = sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h))
        else:
            c_x, c_d0, c_z = sigma_t / sigma_s0, alpha_t * (torch.exp(-h) - 1.0), None
        second = [None] * 5
        if i > 0:
            _, _, lambda_s1 = log_snr(self.sigmas[i - 1])
            r_inv = 1.0 / ((lambda_s0 - lambda_s1) / h)
            midpoint = self.config.solver_type == "midpoint"
            if not sde:
                c_d1 = 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) if midpoint else -(alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0))
            else:
                c_d1 = -(0.5 * (alpha_t * (1 - torch.exp(-2.0 * h)))) if midpoint else -(alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0))
            second = [c_x, c_d0, c_d1, r_inv, c_z]
        return Coefficients(alpha_s0, sigma_s0, c_x, c_d0, c_z, *second)

    def _x0(self, model_output, sample, c: Coefficients):
        cfg = self.config
        if cfg.prediction_type == "epsilon":
            x0 = (sample - c.s_vp * model_output) / c.alpha
        elif cfg.prediction_type == "v_prediction":
            x0 = c.alpha * sample - c.s_vp * model_output
        else:
            x0 = model_output
        if cfg.thresholding:
            x0 = dynamically_thresholded(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        return x0

    def step(self, model_output, timestep, sample, generator=None):
        cfg, i, n = self.config, self.step_index, len(self.timesteps)
        c = self.plan[i]
        final_first_order = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero")
        self.x0_history = (self.x0_history + [self._x0(model_output, sample, c)])[-cfg.solver_order:]
        sample = sample.to(F32)
        noise = randn(model_output.shape, generator, model_output.device, F32) if self.stochastic else None
        d0 = self.x0_history[-1]
        if cfg.solver_order == 1 or len(self.x0_history) < 2 or final_first_order:  # no history yet: first order
            prev = c.c_x * sample - c.c_d0 * d0
            z_coeff = c.c_z
        else:
            d1 = c.r_inv * (d0 - self.x0_history[-2])
            prev = c.c_x2 * sample - c.c_d0_2 * d0 - c.c_d1 * d1
            z_coeff = c.c_z2
        if noise is not None:
            prev = prev + z_coeff * noise
        self.step_index += 1
        return prev.to(model_output.dtype)

    def add_noise(self, original, noise):
        alpha, sigma = alpha_sigma(self.sigmas[self.step_index])  # VP form: alpha x0 + sigma noise
        return alpha * original + sigma * noise
