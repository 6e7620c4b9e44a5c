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

from ..components import VAE_FACTOR, nearest_sizes
from ..errors import SdtrtError
from . import backends, prompt_weights, schedulers
from .artifacts import ModelDir, open_model_dir
from .guidance import guided, rescaled
from .images import to_pil
from .noise import randn
from .tokenizer import CLIPTokenizer


@dataclasses.dataclass
class Result:
    images: list  # PIL images, prompt-major: prompt 0's images first
    timings: dict[str, Any]  # seconds per stage; "unet_calls" a count; "step_seconds" each denoising step
    seed: int | None
    parameters: list[dict[str, Any]]  # per image, what made it (also written into PNGs)


@dataclasses.dataclass
class _Timer:
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    stamps: list[float] = dataclasses.field(default_factory=list)  # denoising loop: start, then each step's end

    def add(self, stage: str, seconds: float) -> None:
        self.times[stage] = self.times.get(stage, 0.0) + seconds


@dataclasses.dataclass
class _Inpaint:
    """What the denoising loop needs for inpainting (all already batched, CFG-doubled where used)."""

    mask: torch.Tensor  # [B2 or B, 1, h, w] latent-size mask (1 = repaint)
    masked_latents: torch.Tensor  # [B2 or B, 4, h, w] latents of the image with the masked area blanked
    image_latents: torch.Tensor | None  # [B, 4, h, w] latents of the image (4-channel UNets blend with it)
    noise: torch.Tensor  # the noise the start latents were drawn with (re-used for blending)
    nine_channel: bool


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

    def close(self) -> None:
        closer = getattr(self.backend, "close", None)
        if closer is not None:
            closer()

    # --- stages --------------------------------------------------------------------------------

    def _encoder_output(self, ids: torch.Tensor, clip_skip: int | None, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings for `rows` with clip_skip applied, plain embeddings for the other rows)."""
        ids = ids.to(device=self.device, dtype=self.backend.input_dtype("text_encoder", "input_ids"))
        out = self.backend.run("text_encoder", {"input_ids": ids})
        cond = out["text_embeddings"][rows] if clip_skip is None else out["skipped_embeddings"][rows, clip_skip - 1]
        return cond, out["text_embeddings"][rows.stop:]

    def _text_embeddings(self, prompts: list[str], negatives: list[str] | None, per_prompt: int,
                         clip_skip: int | None, syntax: str) -> torch.Tensor:
        """[uncond; cond] embeddings (or cond alone without guidance), each prompt repeated per image."""
        texts = prompts + (negatives or [])
        b = len(prompts)
        if syntax == "plain":
            cond, uncond = self._encoder_output(self.tokenizer.encode(texts), clip_skip, slice(0, b))
        else:
            chunked = [prompt_weights.chunk(self.tokenizer, t) for t in texts]
            count = max(c.ids.shape[0] for c in chunked)
            chunked = [prompt_weights.padded(c, count, self.tokenizer) for c in chunked]
            z_cond, z_uncond = self._encoder_output(torch.cat([c.ids for c in chunked]), clip_skip, slice(0, b * count))
            z = torch.cat([z_cond, z_uncond]).reshape(len(texts), count, *z_cond.shape[1:])
            z = torch.stack([prompt_weights.apply_weights(z[i], c.weights) for i, c in enumerate(chunked)])
            z = z.reshape(len(texts), count * z.shape[2], z.shape[3])
            cond, uncond = z[:b], z[b:]
        cond = cond.repeat_interleave(per_prompt, dim=0)
        if negatives is None:
            return cond
        # diffusers applies clip_skip to the prompt only, never to the negative prompt; so do we
        return torch.cat([uncond.repeat_interleave(per_prompt, dim=0), cond])

    def _vae_latents(self, images: torch.Tensor, generator) -> torch.Tensor:
        """Scaled latents sampled from the VAE's posterior: (mean + std * noise) * scaling_factor,
        drawing the noise as diffusers does (one row per generator for a list)."""
        x = images.to(device=self.device, dtype=self.backend.input_dtype("vae_encoder", "images"))
        if isinstance(generator, (list, tuple)) and len(generator) > 1:
            rows = [self._vae_latents(x[i : i + 1], g) for i, g in enumerate(generator[: x.shape[0]])]
            return torch.cat(rows)
        out = self.backend.run("vae_encoder", {"images": x})
        mean, std = out["latent_mean"].float(), out["latent_std"].float()
        return self.model.meta["vae_scaling_factor"] * (mean + std * randn(mean.shape, generator, self.device, torch.float32))

    def _denoise(self, latents: torch.Tensor, embeddings: torch.Tensor, scheduler: schedulers.Scheduler,
                 guidance_scale: float, guidance_rescale: float, generator, timer: _Timer, progress: bool,
                 inpaint: _Inpaint | None = None) -> torch.Tensor:
        cfg = embeddings.shape[0] == 2 * latents.shape[0]
        unet_dtype = self.backend.input_dtype("unet", "sample")
        embeddings = embeddings.to(self.backend.input_dtype("unet", "encoder_hidden_states"))
        extra = blend_mask = None
        if inpaint is not None and inpaint.nine_channel:  # the inpainting UNet also sees mask and masked image
            extra = torch.cat([inpaint.mask, inpaint.masked_latents], dim=1)
        elif inpaint is not None:  # a standard UNet: blend the known area back in after each step
            blend_mask = inpaint.mask.chunk(2)[0] if cfg else inpaint.mask
        timesteps = scheduler.remaining_timesteps
        # all timesteps as [1] float32 tensors on the device, made once outside the loop
        t_inputs = timesteps.to(torch.float32).reshape(-1, 1).to(self.device).unbind(0)
        stamps = timer.stamps
        stamps.append(time.perf_counter())
        for i, (t, t_in) in enumerate(zip(_progress(timesteps, progress), t_inputs)):
            x = scheduler.scale_model_input(latents, t)
            x = torch.cat([x, x]) if cfg else x
            if extra is not None:
                x = torch.cat([x, extra], dim=1)
            t0 = time.perf_counter()
            noise = self.backend.run("unet", {"sample": x.to(unet_dtype), "timestep": t_in, "encoder_hidden_states": embeddings})["latent"]
            timer.add("unet", time.perf_counter() - t0)
            noise = noise.float()
            if cfg:
                noise, cond = guided(noise, guidance_scale)
                if guidance_rescale > 0:
                    noise = rescaled(noise, cond, guidance_rescale)
            latents = scheduler.step(noise, t, latents, generator=generator)
            if blend_mask is not None:
                # keep the unmasked area on the image's own trajectory, noised to the next level
                known = inpaint.image_latents
                if i < len(timesteps) - 1:
                    known = scheduler.add_noise(known, inpaint.noise)
                latents = (1 - blend_mask) * known + blend_mask * latents
            stamps.append(time.perf_counter())
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
        image: Any = None,
        mask_image: Any = None,
        strength: float | None = None,
        resize: bool = False,
        prompt_syntax: str = "plain",
        progress: bool = True,
        output_type: str = "pil",
    ) -> Result:
        """txt2img; img2img with `image` (+ `strength`); inpainting with `image` and `mask_image`."""
        started = time.perf_counter()
        timer = _Timer()
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if mask_image is not None and image is None:
            raise SdtrtError("mask_image was given without image.", "pass the image to inpaint as image=")
        strength = (1.0 if mask_image is not None else 0.8) if strength is None else strength
        init_image = mask = None
        if image is not None:
            init_image, mask, height, width = self._load_images(image, mask_image, height, width, resize)
        height = height or self.model.meta["default_size"][0]
        width = width or self.model.meta["default_size"][1]
        negatives = self._check(prompts, negative_prompt, num_images_per_prompt, steps, guidance_scale, guidance_rescale,
                                height, width, clip_skip, seed, generator, image is not None, strength, prompt_syntax)
        cfg = guidance_scale > 1.0
        name = scheduler or self.default_scheduler
        sched = schedulers.make(name, self.model.scheduler_config, **dict(scheduler_options or {}))
        sched.set_timesteps(steps)
        if image is not None:  # strength: skip the first (1 - strength) of the schedule, as diffusers does
            t_start = max(steps - min(int(steps * strength), steps), 0)
            if t_start >= steps:
                raise SdtrtError(f"strength={strength} with {steps} steps leaves no denoising step.",
                                 f"raise strength to at least {1 / steps:.3g} or use more steps")
            sched.set_begin_index(t_start * sched.order)
        if generator is None:
            seed = seed if seed is not None else secrets.randbits(32)
            generator = torch.Generator("cpu").manual_seed(seed)
        batch = len(prompts) * num_images_per_prompt
        unet_in = int(self.model.meta["unet_in_channels"])

        t0 = time.perf_counter()
        embeddings = self._text_embeddings(prompts, negatives if cfg else None, num_images_per_prompt, clip_skip, prompt_syntax)
        timer.add("text_encoder", time.perf_counter() - t0)
        self.backend.check_shapes("unet", {"sample": (embeddings.shape[0], unet_in, height // 8, width // 8),
                                           "encoder_hidden_states": tuple(embeddings.shape)})

        t0 = time.perf_counter()
        shape = (batch, int(self.model.meta["latent_channels"]), height // VAE_FACTOR, width // VAE_FACTOR)
        inpaint = None
        if mask is not None:
            latents, inpaint = self._inpaint_start(init_image, mask, shape, sched, generator, strength, cfg, unet_in)
        elif init_image is not None:
            start = self._vae_latents(init_image, generator)
            start = torch.cat([start] * (batch // start.shape[0])) if batch > start.shape[0] else start
            latents = sched.add_noise(start, randn(shape, generator, self.device, torch.float32))
        else:
            latents = randn(shape, generator, self.device, torch.float32) * sched.init_noise_sigma
        timer.add("prepare", time.perf_counter() - t0)
        calls_before = len(sched.remaining_timesteps)

        t0 = time.perf_counter()
        latents = self._denoise(latents, embeddings, sched, guidance_scale, guidance_rescale, generator, timer, progress, inpaint)
        timer.add("denoise", time.perf_counter() - t0)
        timer.times["unet_calls"] = calls_before

        t0 = time.perf_counter()
        decoded = self._decode(latents)
        images = to_pil(decoded) if output_type == "pil" else decoded.float()
        timer.add("vae_decoder", time.perf_counter() - t0)
        timer.times["total"] = time.perf_counter() - started
        timer.times["step_seconds"] = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
        params = [{
            "prompt": prompts[i // num_images_per_prompt],
            "negative_prompt": negatives[i // num_images_per_prompt] if negatives else None,
            "steps": steps, "sampler": schedulers.display_name(name), "guidance_scale": guidance_scale, "seed": seed,
            "height": height, "width": width, "model_hash": self.model.model_hash, "clip_skip": clip_skip,
            "strength": strength if image is not None else None,
        } for i in range(batch)]
        return Result(images, timer.times, seed, params)

    def _inpaint_start(self, init_image, mask_condition, shape, sched, generator, strength: float, cfg: bool, unet_in: int):
        """Start latents and loop state for inpainting, consuming the generator in diffusers' order:
        image latents (when needed), start noise, then the masked image's latents."""
        batch = shape[0]
        nine = unet_in == 9
        full = strength == 1.0
        image_latents = None
        if not nine or not full:
            image_latents = self._vae_latents(init_image, generator)
            image_latents = image_latents.repeat(batch // image_latents.shape[0], 1, 1, 1)
        noise = randn(shape, generator, self.device, torch.float32)
        latents = noise * sched.init_noise_sigma if full else sched.add_noise(image_latents, noise)
        masked_image = init_image * (mask_condition < 0.5)
        mask = torch.nn.functional.interpolate(mask_condition, size=shape[2:]).to(self.device)
        masked_latents = self._vae_latents(masked_image, generator)
        if mask.shape[0] < batch:
            mask = mask.repeat(batch // mask.shape[0], 1, 1, 1)
        if masked_latents.shape[0] < batch:
            masked_latents = masked_latents.repeat(batch // masked_latents.shape[0], 1, 1, 1)
        if cfg:
            mask, masked_latents = torch.cat([mask] * 2), torch.cat([masked_latents] * 2)
        return latents, _Inpaint(mask, masked_latents, image_latents, noise, nine)

    def _load_images(self, image, mask_image, height, width, resize: bool):
        """Image (and mask) as model inputs; sizes checked, resized only when asked (or told the size)."""
        from .images import load_image, load_mask

        if "vae_encoder" not in self.backend.components():
            hint = ("rebuild the engines with --components text_encoder,unet,vae_decoder,vae_encoder (the ONNX dir needs it too)"
                    if self.model.kind == "engines" else "re-export with --components text_encoder,unet,vae_decoder,vae_encoder")
            raise SdtrtError(f"{self.model.root} has no VAE encoder, which img2img and inpainting need.", hint)
        if mask_image is not None and int(self.model.meta["unet_in_channels"]) not in (4, 9):
            raise SdtrtError("this UNet takes neither 4 nor 9 input channels; it cannot inpaint.", "use an SD or SD-inpainting model")
        init, height, width = load_image(image, height, width, resize)
        mask = load_mask(mask_image, height, width, resize, init_size=(init.shape[3], init.shape[2])) if mask_image is not None else None
        return init, mask, height, width

    def _check(self, prompts, negative_prompt, per_prompt, steps, guidance_scale, guidance_rescale, height, width,
               clip_skip, seed, generator, has_image: bool, strength: float, syntax: str) -> list[str]:
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
                raise SdtrtError(f"{name}={v} is not a positive multiple of {VAE_FACTOR}.", f"use {name}={nearest_sizes(v if isinstance(v, (int, float)) and v > 0 else 8)}")
        if not isinstance(steps, int) or steps < 1:
            raise SdtrtError(f"steps={steps!r} is not a positive integer.", "pass steps=1 or more (25-50 is typical)")
        if not isinstance(per_prompt, int) or per_prompt < 1:
            raise SdtrtError(f"num_images_per_prompt={per_prompt!r} is not a positive integer.", "pass 1 or more")
        for name, v in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale)):
            if not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
                raise SdtrtError(f"{name}={v!r} must be a number >= 0.", f"pass e.g. {name}={7.5 if name == 'guidance_scale' else 0.7} ({'<= 1 turns guidance off' if name == 'guidance_scale' else '0 turns it off'})")
        if guidance_rescale > 1:
            raise SdtrtError(f"guidance_rescale={guidance_rescale} is above 1.", "pass a value in [0, 1] (0.7 is the paper's)")
        if has_image and (not isinstance(strength, (int, float)) or math.isnan(strength) or not 0 < strength <= 1):
            raise SdtrtError(f"strength={strength!r} is outside (0, 1].", "pass a value in (0, 1]: low keeps the image, 1 repaints it fully")
        if syntax not in prompt_weights.SYNTAXES:
            raise SdtrtError(f"unknown prompt_syntax {syntax!r}.", "use 'plain' (diffusers: truncate at 77, brackets are text) or 'a1111' (weights, long prompts)")
        kmax = int(self.model.meta["clip_skip_max"])
        if clip_skip is not None and (not isinstance(clip_skip, int) or not 1 <= clip_skip <= kmax):
            raise SdtrtError(f"clip_skip={clip_skip!r} is not available: this export provides clip_skip 1..{kmax}.",
                             "pass clip_skip=None (no skip) or a value in that range")
        if seed is not None and generator is not None:
            raise SdtrtError("both seed and generator were given.", "pass one of them")
        images = len(prompts) * per_prompt if isinstance(per_prompt, int) else None
        if isinstance(generator, (list, tuple)) and len(generator) not in (1, images):
            raise SdtrtError(f"{len(generator)} generators for {images} images.", "pass one generator per image, or a single one")
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
