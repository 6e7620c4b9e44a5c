"""DPM-Solver++(2M) and its SDE variant (Lu et al., 2022, "DPM-Solver++", Algorithm 2; SDE: eq. in App. B).

Works in log-SNR: lambda = log(alpha / sigma), h = lambda_next - lambda. With D0 the newest x0
estimate and D1 = (D0 - D_prev) / r (r = h_prev / h):
  ODE, midpoint: x' = (sigma'/sigma) x - alpha' (e^-h - 1) D0 - 1/2 alpha' (e^-h - 1) D1
  SDE:           x' = (sigma'/sigma) e^-h x + alpha' (1 - e^-2h)(D0 + 1/2 D1) + sigma' sqrt(1 - e^-2h) z
The first step (no history) and, by default, the last step are first order.
"""

from __future__ import annotations

import dataclasses

import torch

from ..noise import randn
from .base import Scheduler
from .common import (F32, F64, BaseConfig, alphas_cumprod, arange_down, interp, karras_sigmas, linspace,
                     refuse, sigma_to_t, train_sigmas)


@dataclasses.dataclass
class Config(BaseConfig):
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"  # or sde-dpmsolver++
    solver_type: str = "midpoint"  # or heun
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"  # zero | sigma_min
    lambda_min_clipped: float = -float("inf")
    rescale_betas_zero_snr: bool = False
    thresholding: bool = False
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
        if config.thresholding or config.variance_type:
            raise refuse(self.name, "thresholding / learned variance", "set thresholding=False, variance_type=None")
        self.alphas_cumprod = alphas_cumprod(config, config.rescale_betas_zero_snr)
        if config.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24
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
        self.step_index = 0
        self.x0_history: list[torch.Tensor] = []  # newest last
        self.lower_order_nums = 0

    def _x0(self, model_output, sample):
        sigma = self.sigmas[self.step_index]
        alpha, s = alpha_sigma(sigma)
        p = self.config.prediction_type
        if p == "epsilon":
            return (sample - s * model_output) / alpha
        if p == "v_prediction":
            return alpha * sample - s * model_output
        return model_output

    def _first_order(self, d0, sample, noise):
        i = self.step_index
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[i + 1])
        _, sigma_s, lambda_s = log_snr(self.sigmas[i])
        h = lambda_t - lambda_s
        if noise is None:
            return sigma_t / sigma_s * sample - alpha_t * (torch.exp(-h) - 1.0) * d0
        return (sigma_t / sigma_s * torch.exp(-h) * sample + alpha_t * (1 - torch.exp(-2.0 * h)) * d0
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)

    def _second_order(self, sample, noise):
        i = self.step_index
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[i + 1])
        _, sigma_s0, lambda_s0 = log_snr(self.sigmas[i])
        _, _, lambda_s1 = log_snr(self.sigmas[i - 1])
        m0, m1 = self.x0_history[-1], self.x0_history[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, 1.0 / r0 * (m0 - m1)
        midpoint = self.config.solver_type == "midpoint"
        if noise is None:
            if midpoint:
                return sigma_t / sigma_s0 * sample - alpha_t * (torch.exp(-h) - 1.0) * d0 - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            return sigma_t / sigma_s0 * sample - alpha_t * (torch.exp(-h) - 1.0) * d0 + alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0) * d1
        decay = sigma_t / sigma_s0 * torch.exp(-h) * sample + alpha_t * (1 - torch.exp(-2.0 * h)) * d0
        if midpoint:
            x = decay + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * d1
        else:
            x = decay + alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0) * d1
        return x + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise

    def step(self, model_output, timestep, sample, generator=None):
        cfg, i, n = self.config, self.step_index, len(self.timesteps)
        final_first_order = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero")
        self.x0_history = (self.x0_history + [self._x0(model_output, sample)])[-cfg.solver_order:]
        sample = sample.to(F32)
        noise = randn(model_output.shape, generator, model_output.device, F32) if self.stochastic else None
        if cfg.solver_order == 1 or self.lower_order_nums < 1 or final_first_order:
            prev = self._first_order(self.x0_history[-1], sample, noise)
        else:
            prev = self._second_order(sample, noise)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self.step_index += 1
        return prev.to(model_output.dtype)
