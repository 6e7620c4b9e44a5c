"""The denoising loop, and the hooks that extend it without branches inside it.

One step: scale the latents for the scheduler, batch them for guidance ([x; x]), let hooks add UNet
inputs (an inpainting UNet's mask channels, ControlNet residuals), run the UNet, combine guidance,
step the scheduler, let hooks amend the latents (inpainting's blend with the known area), then
report the step (progress bars, cancellation, timing).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Mapping, Sequence

import torch

from ..errors import SdtrtError
from .guidance import guided, rescaled
from .schedulers import Scheduler

UNet = Callable[[dict[str, torch.Tensor]], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Step:
    index: int  # from 0
    total: int  # steps this loop runs
    t: torch.Tensor  # the scheduler's timestep

    @property
    def last(self) -> bool:
        return self.index == self.total - 1


class StepHook:
    """Override what you need; every method is a no-op by default."""

    def unet_inputs(self, step: Step, feeds: dict[str, torch.Tensor]) -> None:
        """Add or replace UNet inputs for this step (feeds holds sample, timestep and the conditioning)."""

    def after_step(self, step: Step, latents: torch.Tensor) -> torch.Tensor:
        """Amend the latents the scheduler produced."""
        return latents

    def step_done(self, step: Step) -> None:
        """Called after every step (progress, cancellation)."""


class Cancelled(SdtrtError):
    def __init__(self, step: int, total: int):
        super().__init__(f"cancelled after {step} of {total} denoising steps.", "nothing to fix: the request was cancelled")
        self.done, self.total = step, total


class CancelHook(StepHook):
    """Stops the loop between steps once `event` is set (a client went away, a server shuts down)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def step_done(self, step: Step) -> None:
        if self.event.is_set():
            raise Cancelled(step.index + 1, step.total)


class CallbackHook(StepHook):
    def __init__(self, callback: Callable[[int, int], None]):
        self.callback = callback

    def step_done(self, step: Step) -> None:
        self.callback(step.index + 1, step.total)


class ProgressHook(StepHook):
    def __init__(self, total: int, desc: str = "denoise"):
        from ..progress import progress

        self.bar = progress(total=total, desc=desc, unit="step")

    def step_done(self, step: Step) -> None:
        self.bar.update()
        if step.last:
            self.bar.close()


def denoise(latents: torch.Tensor, scheduler: Scheduler, unet: UNet, conditioning: Mapping[str, torch.Tensor],
            timesteps: torch.Tensor, *, guidance_scale: float, guidance_rescale: float = 0.0, generator=None,
            hooks: Sequence[StepHook] = ()) -> torch.Tensor:
    """Run `timesteps` (the scheduler's remaining ones, possibly cut short) and return the latents.

    `conditioning` holds the UNet inputs that stay fixed (encoder_hidden_states, ...), batched
    [uncond; cond] when guidance is on; guidance is on when its batch is twice the latents'."""
    cfg = next(iter(conditioning.values())).shape[0] == 2 * latents.shape[0]
    device = latents.device
    # every timestep as a [1] float32 tensor on the device, made once outside the loop
    t_inputs = timesteps.to(torch.float32).reshape(-1, 1).to(device).unbind(0)
    total = len(timesteps)
    for i, (t, t_in) in enumerate(zip(timesteps, t_inputs)):
        step = Step(i, total, t)
        x = scheduler.scale_model_input(latents, t)
        feeds = {"sample": torch.cat([x, x]) if cfg else x, "timestep": t_in, **conditioning}
        for hook in hooks:
            hook.unet_inputs(step, feeds)
        noise = unet(feeds).float()
        if cfg:
            noise, cond = guided(noise, guidance_scale)
            if guidance_rescale > 0:
                noise = rescaled(noise, cond, guidance_rescale)
        latents = scheduler.step(noise, t, latents, generator=generator)
        for hook in hooks:
            latents = hook.after_step(step, latents)
        for hook in hooks:
            hook.step_done(step)
    return latents
