"""txt2img on any backend: tokenizer -> text encoder -> denoising loop -> VAE decoder -> images.

Parity promise: for the same model, scheduler, settings and seed, the image equals what diffusers'
StableDiffusionPipeline makes (latents drawn and prompts batched exactly as it does).
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..components import VAE_FACTOR
from ..errors import SdtrtError
from . import backends, schedulers
from .artifacts import ModelDir, open_model_dir
from .guidance import guided, rescaled
from .images import to_pil
from .noise import randn
from .tokenizer import CLIPTokenizer


@dataclasses.dataclass
class Result:
    images: list  # PIL images, prompt-major: prompt 0's images first
    timings: dict[str, float]  # seconds per stage; "unet_calls" is a count
    seed: int | None
    parameters: list[dict[str, Any]]  # per image, what made it (also written into PNGs)


@dataclasses.dataclass
class _Timer:
    times: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.times[stage] = self.times.get(stage, 0.0) + seconds


def _nearest_multiples(v: int) -> str:
    lo = max(VAE_FACTOR, v // VAE_FACTOR * VAE_FACTOR)
    return f"{lo} or {lo + VAE_FACTOR}" if lo != v else str(v)


class Pipeline:
    def __init__(self, model: ModelDir, backend: backends.Backend):
        self.model = model
        self.backend = backend
        self.device = backend.device
        self.tokenizer = CLIPTokenizer.from_dir(model.tokenizer_dir)
        self.default_scheduler = schedulers.resolve(model.scheduler_config.get("_class_name", "PNDMScheduler"))

    @classmethod
    def load(cls, path: Path | str, backend: str = "auto", **backend_options: Any) -> "Pipeline":
        """Open an ONNX dir (backend 'onnxruntime') or an engine dir (backend 'tensorrt'); 'auto' picks."""
        model = open_model_dir(path)
        return cls(model, backends.load(backend, model, **backend_options))

    # --- stages --------------------------------------------------------------------------------

    def _text_embeddings(self, prompts: list[str], negatives: list[str] | None, per_prompt: int,
                         clip_skip: int | None) -> torch.Tensor:
        """[uncond; cond] embeddings (or cond alone without guidance), each prompt repeated per image."""
        ids = self.tokenizer.encode(prompts + (negatives or []))
        ids = ids.to(device=self.device, dtype=self.backend.input_dtype("text_encoder", "input_ids"))
        out = self.backend.run("text_encoder", {"input_ids": ids})
        b = len(prompts)
        cond = out["text_embeddings"][:b] if clip_skip is None else out["skipped_embeddings"][:b, clip_skip - 1]
        cond = cond.repeat_interleave(per_prompt, dim=0)
        if negatives is None:
            return cond
        # diffusers applies clip_skip to the prompt only, never to the negative prompt; so do we
        uncond = out["text_embeddings"][b:].repeat_interleave(per_prompt, dim=0)
        return torch.cat([uncond, cond])

    def _denoise(self, latents: torch.Tensor, embeddings: torch.Tensor, scheduler: schedulers.Scheduler,
                 guidance_scale: float, guidance_rescale: float, generator, timer: _Timer, progress: bool) -> torch.Tensor:
        cfg = embeddings.shape[0] == 2 * latents.shape[0]
        unet_dtype = self.backend.input_dtype("unet", "sample")
        embeddings = embeddings.to(self.backend.input_dtype("unet", "encoder_hidden_states"))
        # all timesteps as [1] float32 tensors on the device, made once outside the loop
        t_inputs = scheduler.timesteps.to(torch.float32).reshape(-1, 1).to(self.device).unbind(0)
        steps = _progress(scheduler.timesteps, progress)
        for t, t_in in zip(steps, t_inputs):
            x = scheduler.scale_model_input(latents, t)
            x = torch.cat([x, x]) if cfg else x
            t0 = time.perf_counter()
            noise = self.backend.run("unet", {"sample": x.to(unet_dtype), "timestep": t_in, "encoder_hidden_states": embeddings})["latent"]
            timer.add("unet", time.perf_counter() - t0)
            noise = noise.float()
            if cfg:
                noise, cond = guided(noise, guidance_scale)
                if guidance_rescale > 0:
                    noise = rescaled(noise, cond, guidance_rescale)
            latents = scheduler.step(noise, t, latents, generator=generator)
        return latents

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = (latents / self.model.meta["vae_scaling_factor"]).to(self.backend.input_dtype("vae_decoder", "latent"))
        return self.backend.run("vae_decoder", {"latent": z})["images"]

    # --- the call ------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        *,
        num_images_per_prompt: int = 1,
        steps: int = 50,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        scheduler: str | None = None,
        scheduler_options: Mapping[str, Any] | None = None,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        clip_skip: int | None = None,
        progress: bool = True,
        output_type: str = "pil",
    ) -> Result:
        started = time.perf_counter()
        timer = _Timer()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height = height or self.model.meta["default_size"][0]
        width = width or self.model.meta["default_size"][1]
        negatives = self._check(prompts, negative_prompt, num_images_per_prompt, steps, guidance_scale, guidance_rescale,
                                height, width, clip_skip, seed, generator)
        cfg = guidance_scale > 1.0
        name = scheduler or self.default_scheduler
        sched = schedulers.make(name, self.model.scheduler_config, **dict(scheduler_options or {}))
        sched.set_timesteps(steps)
        if generator is None:
            seed = seed if seed is not None else secrets.randbits(32)
            generator = torch.Generator("cpu").manual_seed(seed)
        batch = len(prompts) * num_images_per_prompt
        self.backend.check_shapes("unet", {"sample": (2 * batch if cfg else batch, self.model.meta["unet_in_channels"], height // 8, width // 8)})

        t0 = time.perf_counter()
        embeddings = self._text_embeddings(prompts, negatives if cfg else None, num_images_per_prompt, clip_skip)
        timer.add("text_encoder", time.perf_counter() - t0)

        t0 = time.perf_counter()
        shape = (batch, int(self.model.meta["latent_channels"]), height // VAE_FACTOR, width // VAE_FACTOR)
        latents = randn(shape, generator, self.device, torch.float32) * sched.init_noise_sigma
        latents = self._denoise(latents, embeddings, sched, guidance_scale, guidance_rescale, generator, timer, progress)
        timer.add("denoise", time.perf_counter() - t0)
        timer.times["unet_calls"] = len(sched.timesteps)

        t0 = time.perf_counter()
        decoded = self._decode(latents)
        images = to_pil(decoded) if output_type == "pil" else decoded.float()
        timer.add("vae_decoder", time.perf_counter() - t0)
        timer.times["total"] = time.perf_counter() - started
        params = [{
            "prompt": prompts[i // num_images_per_prompt],
            "negative_prompt": negatives[i // num_images_per_prompt] if negatives else None,
            "steps": steps, "sampler": schedulers.display_name(name), "guidance_scale": guidance_scale, "seed": seed,
            "height": height, "width": width, "model_hash": self.model.model_hash, "clip_skip": clip_skip,
        } for i in range(batch)]
        return Result(images, timer.times, seed, params)

    def _check(self, prompts, negative_prompt, per_prompt, steps, guidance_scale, guidance_rescale, height, width,
               clip_skip, seed, generator) -> list[str]:
        """Validate a call; returns the negative prompts, one per prompt. Every error names the fix."""
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise SdtrtError("prompt must be a string or a non-empty list of strings.", "pass prompt='a watercolor fox' or a list of such strings")
        if isinstance(negative_prompt, str) or negative_prompt is None:
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise SdtrtError(f"{len(negatives)} negative prompts for {len(prompts)} prompts.",
                                 "pass one negative prompt per prompt, or a single string for all")
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % VAE_FACTOR:
                raise SdtrtError(f"{name}={v} is not a positive multiple of {VAE_FACTOR}.", f"use {name}={_nearest_multiples(int(v) if isinstance(v, (int, float)) and v > 0 else 8)}")
        if not isinstance(steps, int) or steps < 1:
            raise SdtrtError(f"steps={steps!r} is not a positive integer.", "pass steps=1 or more (25-50 is typical)")
        if not isinstance(per_prompt, int) or per_prompt < 1:
            raise SdtrtError(f"num_images_per_prompt={per_prompt!r} is not a positive integer.", "pass 1 or more")
        for name, v in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale)):
            if not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
                raise SdtrtError(f"{name}={v!r} must be a number >= 0.", f"pass e.g. {name}={7.5 if name == 'guidance_scale' else 0.7} ({'<= 1 turns guidance off' if name == 'guidance_scale' else '0 turns it off'})")
        if guidance_rescale > 1:
            raise SdtrtError(f"guidance_rescale={guidance_rescale} is above 1.", "pass a value in [0, 1] (0.7 is the paper's)")
        kmax = int(self.model.meta["clip_skip_max"])
        if clip_skip is not None and (not isinstance(clip_skip, int) or not 1 <= clip_skip <= kmax):
            raise SdtrtError(f"clip_skip={clip_skip!r} is not available: this export provides clip_skip 1..{kmax}.",
                             "pass clip_skip=None (no skip) or a value in that range")
        if seed is not None and generator is not None:
            raise SdtrtError("both seed and generator were given.", "pass one of them")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise SdtrtError(f"seed={seed!r} must be a non-negative integer.", "pass e.g. seed=42")
        missing = {"text_encoder", "unet", "vae_decoder"} - self.backend.components()
        if missing:
            raise SdtrtError(f"{self.model.root} lacks {', '.join(sorted(missing))}.", "export/build it with the default components")
        return negatives


def _progress(items, enabled: bool):
    if not enabled:
        return items
    from ..progress import progress

    bar = progress(total=len(items), desc="denoise", unit="step")

    def gen():
        for x in items:
            yield x
            bar.update()
        bar.close()

    return gen()
