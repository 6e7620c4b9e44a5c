"""UniPC (Zhao et al., 2023, "UniPC: A Unified Predictor-Corrector Framework"), B(h) = e^h - 1 ("bh2").

Each step first corrects the current sample with the new model output (UniC, Algorithm 2, using
the previous step's predictor input), then predicts the next sample (UniP, Algorithm 1), both in
data (x0) prediction form. Coefficients rho solve R rho = b with R_ik = r_k^(i-1) and
b_i = i! phi_{i+1}(h) / B(h) (eq. 9-10); order 1 uses rho = 1/2.
"""

from __future__ import annotations

import dataclasses

import torch

from .base import Scheduler
from .common import (F32, BaseConfig, ThresholdingConfig, alphas_cumprod_for_sigmas, dynamically_thresholded, interp,
                     karras_sigmas, refuse, sigma_to_t, train_sigmas)
from .dpmpp_2m import alpha_sigma, log_snr, multistep_timesteps


@dataclasses.dataclass
class Config(ThresholdingConfig, BaseConfig):
    solver_order: int = 2
    predict_x0: bool = True
    solver_type: str = "bh2"  # or bh1
    lower_order_final: bool = True
    disable_corrector: list[int] = dataclasses.field(default_factory=list)
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"
    rescale_betas_zero_snr: bool = False


class UniPC(Scheduler):
    name = "unipc"
    Config = Config

    def __init__(self, config: Config):
        super().__init__(config)
        if config.solver_type not in ("bh1", "bh2"):
            raise refuse(self.name, f"solver_type={config.solver_type}", "use bh2 (or bh1)")
        if not config.predict_x0:
            raise refuse(self.name, "predict_x0=False (noise prediction)", "use predict_x0=True")
        self.alphas_cumprod = alphas_cumprod_for_sigmas(config, config.rescale_betas_zero_snr)
        self.sigmas = torch.empty(0)

    def set_timesteps(self, num_inference_steps: int) -> None:
        self._check_steps(num_inference_steps)
        cfg, ac, n = self.config, self.alphas_cumprod, num_inference_steps
        timesteps = multistep_timesteps(cfg, n, cfg.num_train_timesteps)
        base = train_sigmas(ac)
        if cfg.use_karras_sigmas:
            lo = cfg.sigma_min if cfg.sigma_min is not None else base[0].item()
            hi = cfg.sigma_max if cfg.sigma_max is not None else base[-1].item()
            sigmas = karras_sigmas(lo, hi, n)
            timesteps = sigma_to_t(sigmas, torch.log(base)).round()
            last = sigmas[-1].reshape(1) if cfg.final_sigmas_type == "sigma_min" else sigmas.new_zeros(1)
        else:
            sigmas = interp(timesteps, base)
            last = (((1 - ac[0]) / ac[0]) ** 0.5 if cfg.final_sigmas_type == "sigma_min" else torch.tensor(0.0)).reshape(1).double()
        self.sigmas = torch.cat([sigmas, last]).to(F32)
        self.timesteps = timesteps.long()
        self.step_index = 0
        self.x0_history: list[torch.Tensor] = []  # newest last, at most solver_order
        self.lower_order_nums = 0
        self.last_sample: torch.Tensor | None = None
        self.this_order = 1

    def _x0(self, model_output, sample):
        alpha, s = alpha_sigma(self.sigmas[self.step_index])
        cfg = self.config
        if cfg.prediction_type == "epsilon":
            x0 = (sample - s * model_output) / alpha
        elif cfg.prediction_type == "v_prediction":
            x0 = alpha * sample - s * model_output
        else:
            x0 = model_output
        if cfg.thresholding:
            x0 = dynamically_thresholded(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        return x0

    def _coefficients(self, h, rks: list[torch.Tensor], order: int):
        """(h_phi_1, B(h), R, b) of eq. 9-10 for hh = -h (data prediction)."""
        hh = -h
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        r = torch.stack(rks + [torch.ones(())])
        rows, b, factorial = [], [], 1
        for i in range(1, order + 1):
            rows.append(torch.pow(r, i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return h_phi_1, b_h, torch.stack(rows), torch.stack(b)

    def _differences(self, lambda_s0, h, m0, first_index: int, order: int):
        """r_k and D1_k = (m_k - m0) / r_k for the history entries behind m0."""
        rks, d1s = [], []
        for k in range(1, order):
            _, _, lambda_sk = log_snr(self.sigmas[first_index - k])
            rk = (lambda_sk - lambda_s0) / h
            rks.append(rk)
            d1s.append((self.x0_history[-(k + 1)] - m0) / rk)
        return rks, d1s

    def _predict(self, sample, order: int):
        """UniP: x at sigmas[i+1] from x at sigmas[i]."""
        i = self.step_index
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[i + 1])
        _, sigma_s0, lambda_s0 = log_snr(self.sigmas[i])
        h = lambda_t - lambda_s0
        m0 = self.x0_history[-1]
        rks, d1s = self._differences(lambda_s0, h, m0, i, order)
        h_phi_1, b_h, R, b = self._coefficients(h, rks, order)
        x = sigma_t / sigma_s0 * sample - alpha_t * h_phi_1 * m0
        if d1s:
            rhos = torch.ones(1, dtype=sample.dtype) * 0.5 if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).to(sample.dtype)
            x = x - alpha_t * b_h * torch.einsum("k,bkc...->bc...", rhos, torch.stack(d1s, dim=1))
        else:
            x = x - alpha_t * b_h * 0
        return x.to(sample.dtype)

    def _correct(self, model_x0, last_sample, order: int):
        """UniC: refine the sample at sigmas[i] using the model output there (m_t = model_x0)."""
        i = self.step_index
        alpha_t, sigma_t, lambda_t = log_snr(self.sigmas[i])
        _, sigma_s0, lambda_s0 = log_snr(self.sigmas[i - 1])
        h = lambda_t - lambda_s0
        m0 = self.x0_history[-1]
        rks, d1s = self._differences(lambda_s0, h, m0, i - 1, order)
        h_phi_1, b_h, R, b = self._coefficients(h, rks, order)
        rhos = torch.ones(1, dtype=last_sample.dtype) * 0.5 if order == 1 else torch.linalg.solve(R, b).to(last_sample.dtype)
        x = sigma_t / sigma_s0 * last_sample - alpha_t * h_phi_1 * m0
        corr = torch.einsum("k,bkc...->bc...", rhos[:-1], torch.stack(d1s, dim=1)) if d1s else 0
        x = x - alpha_t * b_h * (corr + rhos[-1] * (model_x0 - m0))
        return x.to(last_sample.dtype)

    def step(self, model_output, timestep, sample, generator=None):
        cfg, i = self.config, self.step_index
        model_x0 = self._x0(model_output, sample)
        if i > 0 and (i - 1) not in cfg.disable_corrector and self.last_sample is not None:
            sample = self._correct(model_x0, self.last_sample, self.this_order)
        self.x0_history = (self.x0_history + [model_x0])[-cfg.solver_order:]
        order = min(cfg.solver_order, len(self.timesteps) - i) if cfg.lower_order_final else cfg.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)
        self.last_sample = sample
        prev = self._predict(sample, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        self.step_index += 1
        return prev

    def add_noise(self, original, noise):
        alpha, sigma = alpha_sigma(self.sigmas[self.step_index])  # VP form: alpha x0 + sigma noise
        return alpha * original + sigma * noise
