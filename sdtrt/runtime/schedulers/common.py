"""What every scheduler shares: the typed config base, the training noise schedule, timestep spacing
and sigma helpers.

Numerics follow diffusers' precision path on purpose: tensors that diffusers keeps in float32
(betas, alphas_cumprod, final sigmas) are float32 here, and what it computes in numpy float64
(spacings, interpolation, Karras ramps) is float64 here, with numpy's own formulas, so that the
same config gives the same numbers to ~1e-7.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence, TypeVar

import torch

from ...errors import SdtrtError

F32, F64 = torch.float32, torch.float64


@dataclasses.dataclass
class BaseConfig:
    """Fields every scheduler has. Defaults are diffusers' (the SD checkpoints override most)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"  # linear | scaled_linear | squaredcos_cap_v2
    trained_betas: Sequence[float] | None = None
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample
    timestep_spacing: str = "linspace"  # linspace | leading | trailing
    steps_offset: int = 0


@dataclasses.dataclass
class ThresholdingConfig:
    """Imagen's dynamic thresholding of the x0 estimate, with diffusers' field names and defaults (DDIM,
    DPM-Solver++, UniPC and LCM have it; the others do not, in diffusers as here). diffusers calls it
    unsuitable for latent-space models such as Stable Diffusion, whose latents are not bounded by 1."""

    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995  # the quantile of |x0| taken as s, per image
    sample_max_value: float = 1.0  # the largest s


THRESHOLDING_FIELDS = tuple(f.name for f in dataclasses.fields(ThresholdingConfig))

C = TypeVar("C", bound=BaseConfig)


def config_from(cls: type[C], config: Mapping[str, Any], overrides: Mapping[str, Any], scheduler: str) -> C:
    """Build `cls` from a scheduler_config.json dict (unknown keys ignored, as diffusers does) plus
    user overrides (unknown keys refused, so typos do not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise SdtrtError(f"scheduler '{scheduler}' has no option(s) {', '.join(bad)}.", f"valid options: {', '.join(sorted(names))}")
    values = {k: v for k, v in config.items() if k in names}
    values.update(overrides)
    cfg = cls(**values)
    for field, allowed in (("prediction_type", ("epsilon", "v_prediction", "sample")),
                           ("timestep_spacing", ("linspace", "leading", "trailing")),
                           ("beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2"))):
        if getattr(cfg, field) not in allowed:
            raise SdtrtError(f"scheduler '{scheduler}': {field}={getattr(cfg, field)!r} is not supported.", f"use one of {', '.join(allowed)}")
    if isinstance(cfg, ThresholdingConfig):
        _check_thresholding(cfg, scheduler)
    return cfg


def _check_thresholding(cfg: ThresholdingConfig, scheduler: str) -> None:
    if not isinstance(cfg.thresholding, bool):
        raise SdtrtError(f"scheduler '{scheduler}': thresholding={cfg.thresholding!r} is not true or false.", "pass thresholding=True")
    if not cfg.thresholding:
        return  # the other two fields are unused, as in diffusers
    ratio, top = cfg.dynamic_thresholding_ratio, cfg.sample_max_value
    if not _finite(ratio) or not 0 <= ratio <= 1:
        raise SdtrtError(f"scheduler '{scheduler}': dynamic_thresholding_ratio={ratio!r} is not a quantile in [0, 1].",
                         "pass dynamic_thresholding_ratio=0.995 (diffusers' default)")
    if not _finite(top) or top <= 0:
        raise SdtrtError(f"scheduler '{scheduler}': sample_max_value={top!r} is not a positive number.",
                         "pass sample_max_value=1.0 (diffusers' default; Imagen's x0 lives in [-1, 1])")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --- the training noise schedule -----------------------------------------------------------------


def _cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021), eq. 17: betas from alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=F32)


def _zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2024), Algorithm 1: shift and scale sqrt(alpha_bar) so the last step has SNR 0."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    bar = root**2
    alphas = torch.cat([bar[0:1], bar[1:] / bar[:-1]])
    return 1 - alphas


def alphas_cumprod(cfg: BaseConfig, zero_snr: bool = False) -> torch.Tensor:
    """alpha_bar_t for t = 0..T-1, float32 (as the checkpoints' schedulers compute it)."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = torch.tensor(cfg.trained_betas, dtype=F32)
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=F32)
    elif cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=F32) ** 2
    else:
        betas = _cosine_betas(n)
    if zero_snr:
        betas = _zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


def alphas_cumprod_for_sigmas(cfg: BaseConfig, zero_snr: bool) -> torch.Tensor:
    """alphas_cumprod for samplers that divide by it: at zero terminal SNR the last value is 0,
    so (as diffusers does) it is set to 2^-24 to keep sigma finite."""
    ac = alphas_cumprod(cfg, zero_snr)
    if zero_snr:
        ac[-1] = 2**-24
    return ac


def train_sigmas(ac: torch.Tensor) -> torch.Tensor:
    """Karras-style noise levels sigma_t = sqrt((1 - alpha_bar) / alpha_bar), float32, t ascending."""
    return ((1 - ac) / ac) ** 0.5


# --- numpy's float64 building blocks, reproduced in torch ----------------------------------------


def linspace(start: float, stop: float, num: int) -> torch.Tensor:
    """numpy.linspace (endpoint included): start + i * step, last element exactly `stop`."""
    if num == 1:
        return torch.tensor([float(start)], dtype=F64)
    step = (stop - start) / (num - 1)
    y = torch.arange(num, dtype=F64) * step + start
    y[-1] = stop
    return y


def arange_down(start: float, step: float) -> torch.Tensor:
    """numpy.arange(start, 0, -step) for a float step: values start + i * (first difference)."""
    num = math.ceil((0 - start) / -step)
    delta = (start - step) - start  # numpy fills from its first two elements' difference
    y = start + torch.arange(num, dtype=F64) * delta
    if num > 1:
        y[1] = start - step
    return y


def linspace_open(start: float, stop: float, num: int) -> torch.Tensor:
    """numpy.linspace(start, stop, num, endpoint=False)."""
    return torch.arange(num, dtype=F64) * ((stop - start) / num) + start


def interp(x: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy.interp(x, arange(len(fp)), fp) in float64, including its exact-hit rule."""
    fp = fp.to(F64)
    x = x.to(F64)
    j = x.floor().clamp(0, len(fp) - 2).long()
    slope = fp[j + 1] - fp[j]
    out = slope * (x - j.to(F64)) + fp[j]
    out = torch.where(x == j.to(F64), fp[j], out)
    return torch.where(x >= len(fp) - 1, fp[-1], torch.where(x <= 0, fp[0], out))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: sigma_i = (max^(1/rho) + i/(n-1) * (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: torch.Tensor, log_train_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional training timestep of each sigma, by linear interpolation in log-sigma.

    `log_train_sigmas` is float32 (as diffusers has it); the interpolation weight's denominator is
    therefore a float32 difference, which we keep.
    """
    log_sigma = torch.log(sigmas.to(F64).clamp(min=1e-10))
    dists = log_sigma[None, :] - log_train_sigmas.to(F64)[:, None]
    hits = torch.cumsum((dists >= 0).long(), dim=0)
    low = hits.argmax(dim=0)  # first index of the maximum = last index where log_sigma >= table
    # torch.argmax returns the first maximal index, as numpy does
    low = low.clamp(max=len(log_train_sigmas) - 2)
    high = low + 1
    lo32, hi32 = log_train_sigmas[low], log_train_sigmas[high]
    w = ((lo32.to(F64) - log_sigma) / (lo32 - hi32).to(F64)).clamp(0, 1)
    return (1 - w) * low.to(F64) + w * high.to(F64)


def x0_and_eps(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor,
               sqrt_a: torch.Tensor, sqrt_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, epsilon) from a model output, with sqrt_a = sqrt(alpha_bar_t), sqrt_b = sqrt(1 - alpha_bar_t)
    (DDPM eq. 15; Salimans & Ho 2022 for v-prediction)."""
    if prediction_type == "epsilon":
        return (sample - sqrt_b * model_output) / sqrt_a, model_output
    if prediction_type == "sample":
        return model_output, (sample - sqrt_a * model_output) / sqrt_b
    return sqrt_a * sample - sqrt_b * model_output, sqrt_a * model_output + sqrt_b * sample


def prediction_to_x0_eps(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor,
                         alpha_prod_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x0_and_eps for an alpha_bar_t given directly."""
    return x0_and_eps(prediction_type, model_output, sample, alpha_prod_t**0.5, (1 - alpha_prod_t) ** 0.5)


def dynamically_thresholded(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al., 2022, "Photorealistic Text-to-Image Diffusion Models
    with Deep Language Understanding", sec. 2.3): per image, s = the `ratio` quantile of |x0|, clamped to
    [1, max_value]; x0 is clipped to [-s, s] and divided by s. With s = 1 it is plain clipping to [-1, 1].

    The quantile is taken in float32 (or float64) over each image's C*H*W values, as diffusers does.
    """
    dtype, shape = x0.dtype, x0.shape
    flat = x0.reshape(shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(shape).to(dtype)


def refuse(name: str, what: str, fix: str) -> SdtrtError:
    return SdtrtError(f"scheduler '{name}' does not support {what}.", fix)


# --- the sigma (k-diffusion style) samplers: Euler, Euler a, LMS, Heun ---------------------------


def float_timesteps(cfg: BaseConfig, n: int) -> torch.Tensor:
    """Descending timesteps as float32 values, the way the sigma-based samplers space them."""
    T = cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        return linspace(0, T - 1, n).to(F32).flip(0)
    if cfg.timestep_spacing == "leading":
        return (torch.arange(n, dtype=F64) * (T // n)).flip(0).to(F32) + cfg.steps_offset
    return arange_down(T, T / n).round().to(F32) - 1


def input_divisors(sigmas: torch.Tensor) -> list[torch.Tensor]:
    """sqrt(sigma^2 + 1) per step: the model input is x / that (Karras et al. 2022, c_in = 1/sqrt(sigma^2+1)).
    Precomputed as the same float32 scalars diffusers computes each step, so results are bit-identical."""
    return [(s**2 + 1) ** 0.5 for s in sigmas.unbind()]


def sigma_x0(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Denoised estimate at noise level sigma (sample is x = x0 + sigma * eps)."""
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return model_output


def noised_by_alpha(alpha_bar: torch.Tensor, original: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """DDPM forward process: sqrt(a) x0 + sqrt(1 - a) noise."""
    return alpha_bar**0.5 * original + (1 - alpha_bar) ** 0.5 * noise


def noised_by_sigma(sigma: torch.Tensor, original: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Variance-exploding form: x0 + sigma noise."""
    return original + noise * sigma
