"""The scheduler protocol every sampler implements.

A scheduler instance runs one trajectory at a time: `set_timesteps(n)` (re)starts it, then each
`step` advances one position along `timesteps`. The position is an explicit counter, never looked
up from the timestep value, so repeated timestep values (Heun, PLMS) are unambiguous. The pipeline
makes a fresh scheduler per call, so instances are never shared across threads.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .common import BaseConfig, alphas_cumprod_for_sigmas, noised_by_sigma


class Scheduler:
    name: ClassVar[str]
    Config: ClassVar[type[BaseConfig]]
    order: ClassVar[int] = 1  # model evaluations per solver step (Heun: 2)
    stochastic: ClassVar[bool] = False  # draws noise in step()

    def __init__(self, config: BaseConfig):
        self.config = config
        self.timesteps = torch.empty(0)
        self.step_index = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    @property
    def init_noise_sigma(self) -> float | torch.Tensor:
        return 1.0

    def set_timesteps(self, num_inference_steps: int) -> None:
        raise NotImplementedError

    def set_begin_index(self, index: int) -> None:
        """Start the trajectory part-way (img2img / inpainting strength): the next step is `timesteps[index]`."""
        self.step_index = index

    @property
    def remaining_timesteps(self) -> torch.Tensor:
        """The timesteps still to run, from the current position."""
        return self.timesteps[self.step_index:]

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """`original` noised to the level of the current position (where the next step starts)."""
        raise NotImplementedError

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def _check_steps(self, n: int) -> None:
        from ...errors import SdtrtError

        if not isinstance(n, int) or n < 1:
            raise SdtrtError(f"steps must be a positive integer, got {n!r}.", "pass steps=1 or more")
        if n > self.config.num_train_timesteps:
            raise SdtrtError(f"{n} steps exceed the model's {self.config.num_train_timesteps} training timesteps.",
                             f"pass at most {self.config.num_train_timesteps} steps")


class SigmaScheduler(Scheduler):
    """Samplers that work in Karras sigmas (Euler, Euler a, LMS, Heun): x = x0 + sigma * noise.

    Subclasses set `sigmas` (one per timestep plus the final one) and `divisors`
    (sqrt(sigma^2 + 1) per timestep) in set_timesteps.
    """

    sigmas: torch.Tensor
    divisors: list[torch.Tensor]

    def __init__(self, config: BaseConfig):
        super().__init__(config)
        # configs without rescale_betas_zero_snr (LMS, Heun) never rescale, as in diffusers
        self.alphas_cumprod = alphas_cumprod_for_sigmas(config, getattr(config, "rescale_betas_zero_snr", False))
        self.sigmas = torch.empty(0)

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """Initial latent scale: sigma_max (linspace/trailing) or sqrt(sigma_max^2 + 1) (leading), as diffusers has it."""
        top = self.sigmas.max()
        return top if self.config.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample / self.divisors[self.step_index]

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noised_by_sigma(self.sigmas[self.step_index], original, noise)
