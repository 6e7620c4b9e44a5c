"""A request -> images on any backend: text conditioning (the family's) -> start latents -> the
denoising loop -> VAE decoder.

Parity promise: for the same model, scheduler, settings and seed, the image equals what the
family's diffusers pipeline makes (latents drawn and prompts batched exactly as it does).
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..artifacts import ModelDir, open_model_dir
from ..errors import OutOfMemory, SdtrtError
from . import backends, latents as start, schedulers, vae
from .adapters import Adapters
from .denoise import CallbackHook, CancelHook, ProgressHook, Step, StepHook, denoise
from .images import to_pil
from .noise import randn
from .request import InvalidRequest, Request
from .text.factory import load_tokenizer
from .text.tokenizer import CLIPTokenizer

REQUEST_FIELDS = {f.name for f in dataclasses.fields(Request)}


@dataclasses.dataclass
class Result:
    images: list  # PIL images (output_type "pil"), prompt-major: prompt 0's images first
    timings: dict[str, Any]  # seconds per stage; "unet_calls" a count; "step_seconds" each denoising step
    seed: int | None
    parameters: list[dict[str, Any]]  # per image, what made it (also written into PNGs)
    tensors: torch.Tensor | None = None  # output_type "tensor": [B,3,H,W] in [0, 1]
    latents: torch.Tensor | None = None  # output_type "latent": the final latents (a refiner's input)


class _Clock:
    """Stage times that are true on a GPU: the device is synchronized before each reading, and UNet
    calls are timed with CUDA events (one synchronization at the end, not one per step)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.times: dict[str, Any] = {}
        self.unet_events: list = []
        self.stamps: list[float] = []

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def add(self, stage: str, seconds: float) -> None:
        self.times[stage] = self.times.get(stage, 0.0) + seconds

    def timed_unet(self, run: Callable[[dict], torch.Tensor]) -> Callable[[dict], torch.Tensor]:
        def timed(feeds):
            if self.cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                out = run(feeds)
                end.record()
                self.unet_events.append((begin, end))
                return out
            t0 = time.perf_counter()
            out = run(feeds)
            self.add("unet", time.perf_counter() - t0)
            return out

        return timed

    def finish_unet(self) -> None:
        if self.unet_events:
            torch.cuda.synchronize(self.device)
            self.add("unet", sum(b.elapsed_time(e) for b, e in self.unet_events) / 1000)


def _image_size(image, height: int | None, width: int | None, resize: bool) -> tuple[int, int]:
    """(height, width) from an image when the call does not say: its size, a multiple of 8 (or floored to
    one with resize), as diffusers' image processors choose it."""
    from .images import _open, _target_size

    pil = _open(image, "control_image")
    if pil is not None:
        return _target_size(pil.size, height, width, resize, "the control image")
    if isinstance(image, torch.Tensor):
        return _target_size((image.shape[-1], image.shape[-2]), height, width, resize, "the control image")
    return height, width


class _Networks:
    """The components as families' image conditioning calls them (`runtime.conditioning.Networks`)."""

    def __init__(self, pipe: "Pipeline"):
        self.pipe, self.device = pipe, pipe.device

    def has(self, component: str) -> bool:
        return component in self.pipe.backend.components()

    def run(self, component: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        backend = self.pipe.backend
        feeds = {k: v.to(device=self.device, dtype=backend.input_dtype(component, k)) for k, v in feeds.items()}
        return {k: v.float() for k, v in self.pipe._run(component, feeds).items()}


class _StampHook(StepHook):
    def __init__(self, clock: _Clock):
        self.clock = clock

    def step_done(self, step: Step) -> None:
        self.clock.stamps.append(self.clock.now() if self.clock.cuda else time.perf_counter())


class _Text:
    """The family's view of the text encoders: tokenizers and one call per encoder."""

    def __init__(self, pipe: "Pipeline"):
        self.pipe = pipe

    def tokenizer(self, component: str) -> CLIPTokenizer:
        return self.pipe.tokenizers[component]

    def run(self, component: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        backend = self.pipe.backend
        ids = ids.to(device=self.pipe.device, dtype=backend.input_dtype(component, "input_ids"))
        return {k: v.float() for k, v in self.pipe._run(component, {"input_ids": ids}).items()}


class Pipeline:
    def __init__(self, model: ModelDir, backend: backends.Backend):
        self.model = model
        self.backend = backend
        self.device = backend.device
        self.family = model.family
        self.config = model.meta.config
        self.tokenizers = {e: load_tokenizer(model.tokenizer_dir(e)) for e in model.meta.tokenizers}  # CLIP BPE or WordPiece
        self.adapters = Adapters(model, backend, self.tokenizers)
        self.default_scheduler = schedulers.resolve(model.meta.scheduler_config.get("_class_name", "PNDMScheduler"))
        self._local = threading.local()  # the request being run on this thread, for error messages

    @property
    def tokenizer(self) -> CLIPTokenizer:
        """The first text encoder's tokenizer."""
        return next(iter(self.tokenizers.values()))

    @classmethod
    def load(cls, path: Path | str, backend: str = "auto", preload: str | None = None, **backend_options: Any) -> "Pipeline":
        """Open an ONNX dir (backend 'onnxruntime') or an engine dir (backend 'tensorrt' / 'aoti'); 'auto' picks.
        preload (ONNX Runtime): "default" creates the sessions txt2img needs now, "none" when the first request
        that passed its checks needs them, "all" every one now."""
        model = open_model_dir(path)
        return cls(model, backends.load(backend, model, preload=preload, **backend_options))

    def set_loras(self, loras: Sequence[tuple[str | Path, float]], allow_pickle: bool = False) -> None:
        """Make exactly these (file, scale) LoRA / LyCORIS pairs active, without re-export: weights become
        base + Σ scale·ΔW (an empty list restores the export's). Files are checked before anything changes."""
        if loras:
            self._refuse_adapters("LoRA")
        self.adapters.set_loras(loras, allow_pickle)

    def load_textual_inversion(self, path: str | Path, token: str | None = None, allow_pickle: bool = False) -> list[str]:
        """Add a Textual Inversion embedding (A1111, diffusers, kohya or SDXL layout); returns its tokens."""
        self._refuse_adapters("Textual Inversion")
        return self.adapters.load_embedding(path, token, allow_pickle)

    def _refuse_adapters(self, kind: str) -> None:
        reason = self.family.adapter_refusal(self.config)
        if reason:
            raise SdtrtError(f"{kind} is not supported for {self.family.describe(self.config)} models: {reason}.",
                             "merge it into the weights with diffusers (load_lora_weights + fuse_lora, or load_textual_inversion), "
                             "save_pretrained, and export that folder")

    def close(self) -> None:
        closer = getattr(self.backend, "close", None)
        if closer is not None:
            closer()

    # --- the call --------------------------------------------------------------------------------

    def __call__(self, prompt, negative_prompt=None, *, generator=None, progress: bool = True,
                 cancel: threading.Event | None = None, callback: Callable[[int, int], None] | None = None,
                 **params: Any) -> Result:
        """txt2img; img2img with `image` (+ `strength`); inpainting with `image` and `mask_image`; for families
        conditioned on an image, `image` is what they condition on (the x4 upscaler's low-res image, depth2img's
        start image + `depth_map`, unCLIP's image to vary; + `noise_level`).
        Parameters are `sdtrt.Request`'s (diffusers' names); see there for each one."""
        unknown = sorted(set(params) - REQUEST_FIELDS)
        if unknown:
            raise SdtrtError(f"unknown parameter(s): {', '.join(unknown)}.",
                             f"use sdtrt.Request's fields: {', '.join(sorted(REQUEST_FIELDS))}")
        return self.run(Request(prompt, negative_prompt, **params), generator=generator, progress=progress,
                        cancel=cancel, callback=callback)

    def run(self, request: Request, *, generator=None, progress: bool = True, cancel: threading.Event | None = None,
            callback: Callable[[int, int], None] | None = None) -> Result:
        clock = _Clock(self.device)
        started = clock.now()
        request = self.check(request, generator)
        image_inputs = self.family.image_inputs(request, self.config)  # images the family conditions on (upscaler, depth, unCLIP)
        init_image, mask, request = self._inputs(request, image_inputs)
        self._prepare(request, init_image is not None)
        self._local.request = request
        if generator is None:
            seed = request.seed if request.seed is not None else secrets.randbits(32)
            request = request.replace(seed=seed)
            generator = torch.Generator("cpu").manual_seed(seed)
        sched, timesteps = self._schedule(request, init_image is not None)

        t0 = clock.now()
        conditioning = self.family.conditioning(_Text(self), request, self.config)
        self._check_finite("text_encoder", conditioning["encoder_hidden_states"])
        clock.add("text_encoder", clock.now() - t0)
        image_hooks: list[StepHook] = []
        if image_inputs is not None:  # drawn after the prompt and before the latents, as diffusers draws them
            t0 = clock.now()
            inputs, image_hooks = image_inputs.make(_Networks(self), request, generator)
            conditioning.update(inputs)
            clock.add("image_inputs", clock.now() - t0)
        unet_dtypes = {k: self.backend.input_dtype("unet", k) for k in conditioning}
        conditioning = {k: v.to(self.device, unet_dtypes[k]) for k, v in conditioning.items()}
        in_channels = self.model.specs["unet"].tensor("sample").dims[1]
        factor = self.family.latent_factor(self.config)
        self.backend.check_shapes("unet", {"sample": (next(iter(conditioning.values())).shape[0], in_channels,
                                                      request.height // factor, request.width // factor),
                                           **{k: tuple(v.shape) for k, v in conditioning.items()}})

        t0 = clock.now()
        latents, hooks = self._start(request, init_image, mask, sched, generator, in_channels)
        # ControlNets see the latents before an inpainting UNet's (or an image-conditioned family's) extra channels
        hooks = [*self._controlnet(request, conditioning, clock), *hooks, *image_hooks]
        clock.add("prepare", clock.now() - t0)

        hooks = list(hooks)
        if progress:
            hooks.append(ProgressHook(len(timesteps)))
        if cancel is not None:
            hooks.append(CancelHook(cancel))
        if callback is not None:
            hooks.append(CallbackHook(callback))
        hooks.append(_StampHook(clock))
        sample_dtype = self.backend.input_dtype("unet", "sample")

        def unet(feeds: dict[str, torch.Tensor]) -> torch.Tensor:
            feeds["sample"] = feeds["sample"].to(sample_dtype)
            return self._run("unet", feeds)["latent"]

        t0 = clock.now()
        clock.stamps.append(t0)
        latents = denoise(latents, sched, clock.timed_unet(unet), conditioning, timesteps, guidance_scale=request.guidance_scale,
                          guidance_rescale=request.guidance_rescale, generator=generator, hooks=hooks)
        clock.add("denoise", clock.now() - t0)
        clock.finish_unet()
        clock.times["unet_calls"] = len(timesteps)
        self._check_finite("unet", latents)

        images, tensors = [], None
        clock.add("vae_decoder", 0.0)
        if request.output_type != "latent":
            t0 = clock.now()
            z = self.family.unscale_latents(self.config, latents).to(self.backend.input_dtype("vae_decoder", "latent"))
            tiles = vae.Tiles.from_config(self.config["vae"]) if request.vae_tiling else None
            decoded = vae.decode(lambda t: self._run("vae_decoder", {"latent": t}), z, tiles, request.vae_slicing)
            self._check_finite("vae_decoder", decoded)
            if request.output_type == "pil":
                images = to_pil(decoded)
            else:
                tensors = (decoded.float() / 2 + 0.5).clamp(0, 1)
            clock.add("vae_decoder", clock.now() - t0)
        clock.times["total"] = clock.now() - started
        clock.times["step_seconds"] = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]
        return Result(images, clock.times, request.seed, self._parameters(request, sched),
                      tensors=tensors, latents=latents if request.output_type == "latent" else None)

    # --- checks -----------------------------------------------------------------------------------

    def check(self, request: Request, generator=None) -> Request:
        """Validate `request` against this model (and the generator against the batch); every error names the fix."""
        request.check()
        mode = self.family.mode(request)
        controlled = bool(request.controlnets) or request.control_image is not None
        unset = {k: v for k, v in self.family.defaults(mode, controlled).items() if getattr(request, k) is None}
        request = request.replace(**unset) if unset else request
        self.family.check_fields(request, self.config)
        self.family.check_request(request, self.config)
        kmax = self.family.clip_skip_max(self.config)
        if request.clip_skip is not None and request.clip_skip > kmax:
            raise InvalidRequest("clip_skip", request.clip_skip, f"is not available: this export provides clip_skip 1..{kmax}", kmax,
                                 "or None for no skip")
        if request.seed is not None and generator is not None:
            raise SdtrtError("both seed and generator were given.", "pass one of them")
        if isinstance(generator, (list, tuple)) and len(generator) not in (1, request.batch):
            raise SdtrtError(f"{len(generator)} generators for {request.batch} images.", "pass one generator per image, or a single one")
        missing = set(self.family.required_components(request, self.config)) - self.backend.components()
        if missing:
            raise SdtrtError(f"{self.model.root} lacks {', '.join(sorted(missing))}.", "export/build it with the default components")
        return request

    def _prepare(self, request: Request, encodes_image: bool) -> None:
        """Have the backend create, in parallel, the sessions this request will run that it has not made yet
        (after every check: a refused request costs none). Backends without `prepare` load on their own."""
        prepare = getattr(self.backend, "prepare", None)
        if prepare is None:
            return
        needed = set(self.family.required_components(request, self.config)) | ({"vae_encoder"} if encodes_image else set())
        if request.controlnets or request.control_image is not None:
            needed |= {c for c in self.backend.components() if c.startswith("controlnet_")}
        prepare(needed)

    def _check_finite(self, stage: str, x: torch.Tensor) -> None:
        if bool(torch.isfinite(x).all()):
            return
        precision = {c: self.model.dtype(c) for c in self.model.files}
        fix = {"vae_decoder": "use an fp32 VAE: re-export without --fp16-vae" if precision.get("vae_decoder") == "fp16"
               else "lower guidance_scale, or re-export in fp32 (--dtype fp32)",
               "unet": "re-export in fp32 (--dtype fp32), or lower guidance_scale",
               "text_encoder": "re-export in fp32 (--dtype fp32)"}[stage]
        raise SdtrtError(f"the {stage} produced NaN/inf ({precision.get(stage, 'fp32')}); no image was written.", fix)

    # --- stages ----------------------------------------------------------------------------------

    def _run(self, component: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            return self.backend.run(component, feeds)
        except OutOfMemory as e:
            raise self._out_of_memory(e) from None

    def _out_of_memory(self, e: OutOfMemory) -> SdtrtError:
        r = getattr(self._local, "request", None)
        if r is None:
            return e
        native = self.family.default_size(self.config)
        fits = e.largest_side(max(r.height, r.width))
        hint = f"at most about {fits}x{fits} fits here" if fits else "a smaller size fits"
        fix, cli_fix = ("smaller height/width, or fewer prompts/num_images_per_prompt per call",
                        "a smaller --height/--width, or fewer prompts / --num-images per call")
        vae_option = None
        if e.component in ("vae_decoder", "vae_encoder"):  # the VAE alone: tiles (or slices) bound its memory
            if not r.vae_tiling:
                vae_option = ("vae_tiling=True", "--vae-tiling", "the VAE then runs in tiles, in the memory of one tile")
            elif r.batch > 1 and not r.vae_slicing:
                vae_option = ("vae_slicing=True", "--vae-slicing", "the VAE then runs one image at a time")
        if vae_option:
            fix, cli_fix = f"{vae_option[0]} ({vae_option[2]}), or {fix}", f"{vae_option[1]} ({vae_option[2]}), or {cli_fix}"
        return OutOfMemory(e.component,
                           f"the {e.component} ran out of memory at {r.width}x{r.height} with {r.batch} image(s) per call "
                           f"(the model's native size is {native[1]}x{native[0]}; {hint}).", f"pass {fix}", cli_fix=f"pass {cli_fix}")

    def _inputs(self, request: Request, image_inputs=None):
        """Load image and mask; resolve height/width (the image's, the size the family's image conditioning
        implies, or the model's native size) and strength."""
        from .images import load_image, load_mask

        init = mask = None
        height, width = request.height, request.width
        factor = self.family.latent_factor(self.config)
        if image_inputs is not None and image_inputs.size is not None and (height is None or width is None):
            height, width = image_inputs.size
        if request.image is not None and (image_inputs is None or image_inputs.starts_from_image):
            latent_channels = self.family.latent_channels(self.config)
            if isinstance(request.image, torch.Tensor) and request.image.dim() == 4 and request.image.shape[1] == latent_channels:
                init = request.image.float().to(self.device)  # latents: a base model's hand-off
                height, width = init.shape[2] * factor, init.shape[3] * factor
            else:
                if "vae_encoder" not in self.backend.components():
                    wanted = ",".join([*self.model.files, "vae_encoder"])
                    hint = (f"rebuild the engines with --components {wanted} (the ONNX dir needs it too)"
                            if self.model.kind == "engines" else f"re-export with --components {wanted}")
                    raise SdtrtError(f"{self.model.root} has no VAE encoder, which img2img and inpainting need.", hint)
                init, height, width = load_image(request.image, height, width, request.resize)
                if request.mask_image is not None:
                    mask = load_mask(request.mask_image, height, width, request.resize, init_size=(init.shape[3], init.shape[2]))
        if (height is None or width is None) and request.control_image is not None:
            height, width = _image_size(request.per_controlnet("control_image")[0] if request.controlnets else request.control_image,
                                        height, width, request.resize)
        native = self.family.default_size(self.config)
        height = height if height is not None else native[0]
        width = width if width is not None else native[1]
        return init, mask, request.replace(height=height, width=width)

    def _controlnet(self, r: Request, conditioning: dict[str, torch.Tensor], clock: _Clock) -> list[StepHook]:
        """The ControlNet hook for an export whose UNet takes residuals (it feeds zeros when none runs)."""
        from .controlnet import RESIDUALS, ControlNetHook, Net, load_control_image

        unet = self.model.specs["unet"]
        exported = [n for n in self.family.controlnets(self.config) if f"controlnet_{n}" in self.backend.components()]
        if not any(t.name.startswith(RESIDUALS) for t in unet.inputs):
            if r.controlnets or r.control_image is not None:
                raise SdtrtError(f"{self.model.root} has no ControlNet.",
                                 "re-export the model with one: sdtrt.export.export_model(MODEL, DIR, controlnets=[(CONTROLNET_DIR, NAME)])",
                                 cli_fix="re-export with sdtrt export MODEL --out DIR --controlnet CONTROLNET_DIR[:NAME]")
            return []
        names = r.controlnets
        if not names and r.control_image is not None:
            if len(exported) != 1:
                raise InvalidRequest("controlnet", None, f"is needed: this export holds {', '.join(exported)}", exported[0])
            names, r = exported, r.replace(controlnet=exported[0])
        unknown = [n for n in names if n not in exported]
        if unknown:
            raise InvalidRequest("controlnet", unknown[0], f"is not in this export (it holds {', '.join(exported) or 'none'})",
                                 exported[0] if exported else "canny")
        nets = []
        for name, image, scale, start, end in zip(names, r.per_controlnet("control_image"), r.per_controlnet("controlnet_conditioning_scale"),
                                                 r.per_controlnet("control_guidance_start"), r.per_controlnet("control_guidance_end")):
            x = load_control_image(image, r.height, r.width, r.resize).to(self.device)
            x = x.repeat_interleave(r.batch if x.shape[0] == 1 else r.num_images_per_prompt, dim=0)
            if r.cfg and not r.guess_mode:
                x = torch.cat([x, x])
            nets.append(Net(f"controlnet_{name}", x, float(scale), float(start), float(end)))
        dtypes = {("unet", t.name): self.backend.input_dtype("unet", t.name) for t in unet.inputs}
        for net in nets:
            spec = self.model.specs[net.component]
            dtypes.update({(net.component, t.name): self.backend.input_dtype(net.component, t.name) for t in spec.inputs})
        added = [k for k in conditioning if k != "encoder_hidden_states"]

        def run(component: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            t0 = clock.now()
            out = self._run(component, feeds)
            clock.add("controlnet", clock.now() - t0)
            clock.times["controlnet_calls"] = clock.times.get("controlnet_calls", 0) + 1
            return out

        return [ControlNetHook(run, nets, unet, dtypes, added, r.cfg, r.guess_mode)]

    def _schedule(self, r: Request, from_image: bool) -> tuple[schedulers.Scheduler, torch.Tensor]:
        """A fresh scheduler and the timesteps this call runs (strength / denoising_start skip the start of
        the schedule, denoising_end stops early), as diffusers' pipelines choose them."""
        name = r.scheduler or self.default_scheduler
        sched = schedulers.make(name, self.model.meta.scheduler_config, **dict(r.scheduler_options))
        sched.set_timesteps(r.steps)
        train = sched.config.num_train_timesteps
        if from_image and r.denoising_start is not None:
            cutoff = int(round(train - r.denoising_start * train))
            n = int((sched.timesteps < cutoff).sum())
            if sched.order == 2 and n % 2 == 0:
                n += 1  # end after a second-order step's second half, as diffusers does
            sched.set_begin_index(len(sched.timesteps) - n)
        elif from_image:
            t_start = max(r.steps - min(int(r.steps * r.strength), r.steps), 0)
            if t_start >= r.steps:
                raise InvalidRequest("strength", r.strength, f"with steps={r.steps} leaves no denoising step",
                                     round(1 / r.steps + 1e-3, 3), "or use more steps")
            sched.set_begin_index(t_start * sched.order)
        timesteps = sched.remaining_timesteps
        if r.denoising_end is not None:
            cutoff = int(round(train - r.denoising_end * train))
            timesteps = timesteps[: int((timesteps >= cutoff).sum())]
        if len(timesteps) == 0:
            raise InvalidRequest("denoising_start", r.denoising_start, "leaves no denoising step", 0.8)
        return sched, timesteps

    def _start(self, r: Request, init, mask, sched, generator, in_channels: int) -> tuple[torch.Tensor, list[StepHook]]:
        factor = self.family.latent_factor(self.config)
        shape = (r.batch, self.family.latent_channels(self.config), r.height // factor, r.width // factor)
        if init is None:
            return start.txt2img(shape, sched, generator, self.device), []
        if mask is not None:
            job = start.inpaint(init, mask, shape, sched, generator, self.device, self._encode, r.strength, r.cfg,
                                nine_channel=in_channels > shape[1])
            return job.latents, [job.hook]
        if init.shape[1] == shape[1]:  # latents given
            return start.img2img(init, shape, sched, generator, self.device, add_noise=r.denoising_start is None), []
        if isinstance(generator, (list, tuple)) and len(generator) > 1:
            init = start.repeat_to(init, shape[0])  # diffusers' img2img encodes the image once per generator
        return start.img2img(self._encode(init, generator), shape, sched, generator, self.device,
                             add_noise=r.denoising_start is None), []

    def _encode(self, images: torch.Tensor, generator) -> torch.Tensor:
        """Scaled latents sampled from the VAE's posterior, (mean + std * noise), drawing the noise as
        diffusers does (one row per generator for a list)."""
        x = images.to(device=self.device, dtype=self.backend.input_dtype("vae_encoder", "images"))
        if isinstance(generator, (list, tuple)) and len(generator) > 1:
            return torch.cat([self._encode(x[i : i + 1], g) for i, g in enumerate(generator[: x.shape[0]])])
        r = self._local.request
        tiles = vae.Tiles.from_config(self.config["vae"]) if r.vae_tiling else None
        mean, std = vae.encode(lambda t: self._run("vae_encoder", {"images": t}), x, tiles, r.vae_slicing)
        mean, std = mean.float(), std.float()
        return self.family.scale_latents(self.config, mean + std * randn(mean.shape, generator, self.device, torch.float32))

    def _parameters(self, r: Request, sched) -> list[dict[str, Any]]:
        negatives = r.negatives
        n = r.num_images_per_prompt
        return [{
            "prompt": r.prompts[i // n],
            "negative_prompt": negatives[i // n] if negatives and r.cfg else None,
            "steps": r.steps, "sampler": schedulers.display_name(r.scheduler or self.default_scheduler),
            "guidance_scale": r.guidance_scale, "seed": r.seed, "height": r.height, "width": r.width,
            "model_hash": self.model.model_hash, "clip_skip": r.clip_skip, "strength": r.strength, "noise_level": r.noise_level,
            "loras": [(Path(a.path).stem, a.sha256) for a, _ in self.adapters.loras],
            "embeddings": [(token, emb.sha256) for token, (emb, _) in self.adapters.embeddings.items()],
        } for i in range(r.batch)]

