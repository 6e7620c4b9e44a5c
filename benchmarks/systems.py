"""The systems a benchmark compares. Each loads once, then runs the same request, reporting
per-stage seconds (text encoder(s), UNet per call, VAE decode), end-to-end seconds and the image.

Every system runs the model's family through its own text-to-image pipeline: diffusers'
`family.pipeline_classes[0]` (StableDiffusionPipeline, StableDiffusionXLPipeline), Optimum's ORT
counterpart of that class, and `sdtrt.Pipeline` (which reads the family from the export). The request
is one `sdtrt.Request`; `diffusers_arguments` is the one place its fields become diffusers' keywords.

Stage times for diffusers and Optimum come from wrapping their components' forward methods with
timers (synchronizing CUDA first on a GPU), so every system is timed at the same boundaries. A
family with two text encoders (SDXL) reports their sum as the text-encoder stage, as sdtrt does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sdtrt.runtime.request import Request  # the request type every front end shares: one for all systems


def text_to_image_class(family) -> str:
    """diffusers' text-to-image pipeline class for an sdtrt family: the first one it lists."""
    return family.pipeline_classes[0]


def diffusers_arguments(r: Request) -> dict[str, Any]:
    """`r` in diffusers' keywords (generator aside): the fields the benchmark sets, plus any SDXL
    fields given. Defaults left as None stay out, so each pipeline applies its own."""
    args: dict[str, Any] = {"prompt": r.prompts, "negative_prompt": r.negatives, "num_inference_steps": r.steps,
                            "guidance_scale": r.guidance_scale, "height": r.height, "width": r.width,
                            "num_images_per_prompt": r.num_images_per_prompt}
    if r.guidance_rescale:
        args["guidance_rescale"] = r.guidance_rescale
    for name in ("prompt_2", "negative_prompt_2", "clip_skip"):
        if getattr(r, name) is not None:
            args[name] = getattr(r, name)
    if r.control_image is not None:  # diffusers' ControlNet pipelines call the control image `image`
        args["image"] = r.control_image
        if r.controlnet_conditioning_scale is not None:
            args["controlnet_conditioning_scale"] = r.controlnet_conditioning_scale
    return {k: v for k, v in args.items() if v is not None}


@dataclasses.dataclass
class Sample:
    end_to_end: float
    text_encoder: float
    unet_per_call: float
    unet_calls: int
    vae_decoder: float
    image: np.ndarray  # uint8 [H,W,3] of the first image
    controlnet_per_call: float | None = None  # with a ControlNet: seconds per ControlNet call (the added per-step cost)


class _Timers:
    """Accumulates seconds per stage across wrapped calls."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            self.sync()
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - t
            self.calls[stage] = self.calls.get(stage, 0) + 1
            return out

        return timed


def _sync_for(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _uint8(image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


OVERHEAD_STEPS = 20  # the no-op-UNet runs use at least this many steps, and report the median step


def _median_interval(stamps: list[float]) -> float:
    import statistics

    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return statistics.median(gaps)


class System:
    name: str
    device: torch.device
    pipe: Any

    def run(self, r: Request) -> Sample:
        raise NotImplementedError

    def step_overhead(self, r: Request) -> float | None:
        """Seconds per denoising step spent outside the UNet itself (UNet replaced by a no-op)."""
        return None

    def close(self) -> None:
        """Let go of the model, so that its memory can be freed (see `unload`)."""
        self.pipe = None


def unload(system: System) -> None:
    """Free a system's memory before the next one loads: drop the pipeline, collect the cycles the
    stage timers make (a component's forward wraps the component itself), hand freed heap back to
    the OS (glibc keeps it otherwise, and RSS would not show the next system alone) and CUDA's cache."""
    system.close()
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: freed memory is returned as that allocator sees fit
    if system.device.type == "cuda":
        torch.cuda.empty_cache()


def _present(pipe, names: tuple[str, ...]) -> list[Any]:
    return [getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None]


def _no_watermark(cls) -> dict[str, Any]:
    """SDXL pipelines add an invisible watermark when the package for it is installed; sdtrt does not,
    and the same-image check compares what the models made, so it is off for every system."""
    return {"add_watermarker": False} if "add_watermarker" in inspect.signature(cls.__init__).parameters else {}


class _DiffusersPipelineSystem(System):
    """Eager diffusers and Optimum both run diffusers' pipeline code over their own components:
    scheduler swap, call, stage timers and the no-op-engine overhead run are shared here."""

    timers: _Timers

    def _instrument(self, text_encoders: list[Any], unet, vae_decode_owner, vae_decode_attr: str) -> None:
        self.timers = _Timers(_sync_for(self.device))
        for encoder in text_encoders:  # one stage: with two encoders (SDXL) their times add up
            encoder.forward = self.timers.wrap("text_encoder", encoder.forward)
        unet.forward = self.timers.wrap("unet", unet.forward)
        setattr(vae_decode_owner, vae_decode_attr, self.timers.wrap("vae_decoder", getattr(vae_decode_owner, vae_decode_attr)))
        self._scheduler_class, self._scheduler_config = type(self.pipe.scheduler), dict(self.pipe.scheduler.config)

    def _call(self, r: Request, **extra):
        import diffusers

        from sdtrt.runtime import schedulers as S

        if r.scheduler is None:  # the model's own, as sdtrt does
            self.pipe.scheduler = self._scheduler_class.from_config(self._scheduler_config)
        else:
            cls = getattr(diffusers, S.diffusers_class_name(r.scheduler))
            self.pipe.scheduler = cls.from_config(self._scheduler_config, **S.implied_overrides(r.scheduler))
        gen = torch.Generator("cpu").manual_seed(r.seed)
        with torch.inference_mode():
            return self.pipe(**diffusers_arguments(r), generator=gen, **extra)

    def run(self, r: Request) -> Sample:
        self.timers.reset()
        sync = _sync_for(self.device)
        sync()
        t = time.perf_counter()
        out = self._call(r)
        sync()
        total = time.perf_counter() - t
        s, c = self.timers.seconds, self.timers.calls
        controlnet = s["controlnet"] / c["controlnet"] if c.get("controlnet") else None
        return Sample(total, s.get("text_encoder", 0.0), s["unet"] / c["unet"], c["unet"], s["vae_decoder"], _uint8(out.images[0]),
                      controlnet)

    def _noop_engine(self):
        """A context manager during which the UNet's engine call costs nothing."""
        raise NotImplementedError

    def step_overhead(self, r: Request) -> float:
        stamps: list[float] = []

        def on_step_end(pipe, i, t, kwargs):
            stamps.append(time.perf_counter())
            return kwargs

        with self._noop_engine():
            self._call(r.replace(steps=max(r.steps, OVERHEAD_STEPS)), callback_on_step_end=on_step_end)
        return _median_interval(stamps)


class DiffusersSystem(_DiffusersPipelineSystem):
    """Eager diffusers, the family's text-to-image pipeline: fp32 on CPU; fp16 with SDPA on CUDA
    (optionally torch.compile'd UNet)."""

    def __init__(self, model_dir: Path, device: torch.device, family, compile_unet: bool = False, controlnet: Path | None = None):
        import diffusers
        from diffusers.models.attention_processor import AttnProcessor2_0

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.name = "diffusers" + ("+compile" if compile_unet else "")
        self.device = device
        extra: dict[str, Any] = {}
        name = text_to_image_class(family)
        if controlnet is not None:  # StableDiffusion(XL)ControlNetPipeline
            name = name.replace("Pipeline", "ControlNetPipeline")
            extra["controlnet"] = diffusers.ControlNetModel.from_pretrained(controlnet, torch_dtype=dtype)
            if family.name == "sd":
                extra.update(safety_checker=None, requires_safety_checker=False)
        cls = getattr(diffusers, name)
        self.pipe = cls.from_pretrained(model_dir, torch_dtype=dtype, **_no_watermark(cls), **extra).to(device)
        if controlnet is not None:  # its calls are a stage of their own: the per-step cost a ControlNet adds
            self.pipe.controlnet.forward = self._timed_controlnet(extra["controlnet"])
        self.pipe.unet.set_attn_processor(AttnProcessor2_0())  # SDPA
        self.pipe.set_progress_bar_config(disable=True)
        if compile_unet:
            self.pipe.unet = torch.compile(self.pipe.unet)
        p = self.pipe
        self._instrument(_present(p, family.text_encoders), p.unet, p.vae, "decode")

    def _timed_controlnet(self, net):
        forward = type(net).forward.__get__(net)
        return lambda *a, **k: self.timers.wrap("controlnet", forward)(*a, **k)

    def close(self) -> None:
        super().close()
        if self.name.endswith("+compile"):
            torch._dynamo.reset()  # compiled graphs hold on to the UNet's weights

    @contextlib.contextmanager
    def _noop_engine(self):
        """The UNet's forward returns a ready tensor: what remains per step is diffusers' own work."""
        unet, timed = self.pipe.unet, self.pipe.unet.forward
        cached: dict = {}

        def noop(sample, *a, **k):
            out = cached.setdefault(tuple(sample.shape), torch.zeros_like(sample))
            return (out,) if not k.get("return_dict", True) else type("O", (), {"sample": out})()

        unet.forward = noop
        try:
            yield
        finally:
            unet.forward = timed


class OptimumSystem(_DiffusersPipelineSystem):
    """Optimum's ONNX Runtime pipeline for the family (ORTStableDiffusionPipeline, ORTStableDiffusionXLPipeline),
    over its own ONNX export of the same folder (`export`, cached by the weights' hash)."""

    SOURCE = "sdtrt-bench-source.json"  # written into the export: the weights it came from

    def __init__(self, cache: Path, device: torch.device, family, threads: int = 0):
        import onnxruntime as ort

        self.name = "optimum-ort"
        self.device = device
        cls = self.pipeline_class(family)
        provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.pipe = cls.from_pretrained(str(cache), provider=provider, session_options=options, **_no_watermark(cls))
        self.pipe.set_progress_bar_config(disable=True)
        p = self.pipe
        # Optimum names its sessions as diffusers names the modules (text_encoder, text_encoder_2, unet);
        # the VAE is split, and the pipeline's vae.decode calls vae_decoder
        self._instrument(_present(p, family.text_encoders), p.unet, p.vae_decoder, "forward")

    @staticmethod
    def pipeline_class(family):
        """Optimum's counterpart of the family's diffusers pipeline, or None where it has none."""
        import optimum.onnxruntime

        return getattr(optimum.onnxruntime, "ORT" + text_to_image_class(family), None)

    @classmethod
    def export(cls, model_dir: Path, cache: Path, weights_sha256: str, family, log=print) -> Path:
        """Optimum's own ONNX export of `model_dir` into `cache`, made once per weights (all or nothing)."""
        if cls.exported_from(cache) != weights_sha256:
            from sdtrt.files import atomic_dir

            log(f"exporting with Optimum to {cache} (once)")
            with atomic_dir(cache, force=True) as tmp:  # all or nothing: a killed export is never reused
                cls.pipeline_class(family).from_pretrained(str(model_dir), export=True).save_pretrained(str(tmp))
                gc.collect()  # the exporter's torch copy of the model
                (tmp / cls.SOURCE).write_text(json.dumps({"path": str(Path(model_dir).absolute()), "sha256": weights_sha256}) + "\n")
        return cache

    @classmethod
    def exported_from(cls, cache: Path) -> str | None:
        """The weights hash an earlier export in `cache` was made from (None: no complete export there)."""
        try:
            return json.loads((cache / cls.SOURCE).read_text())["sha256"] if (cache / "model_index.json").is_file() else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @contextlib.contextmanager
    def _noop_engine(self):
        """The UNet session's run returns a ready array: Optimum's own conversions per step remain."""
        session = self.pipe.unet.session
        real_run = session.run
        cached: dict = {}

        def noop_run(output_names, feeds, *a, **k):
            sample = feeds["sample"]
            return [cached.setdefault(sample.shape, np.zeros_like(sample))]

        session.run = noop_run
        try:
            yield
        finally:
            session.run = real_run


class SdtrtSystem(System):
    """sdtrt's runtime on one backend (ONNX Runtime on an ONNX dir, TensorRT on an engine dir). The
    family comes from the export; the request goes in as it is."""

    def __init__(self, path: Path, backend: str, device: torch.device, name: str | None = None, **options: Any):
        from sdtrt import Pipeline

        self.name = name or f"sdtrt-{backend}"
        self.device = device
        self.pipe = Pipeline.load(path, backend=backend, **options)

    def run(self, r: Request) -> Sample:
        res = self.pipe.run(r, progress=False)
        t = res.timings
        controlnet = t["controlnet"] / t["controlnet_calls"] if t.get("controlnet_calls") else None
        return Sample(t["total"], t["text_encoder"], t["unet"] / t["unet_calls"], int(t["unet_calls"]), t["vae_decoder"],
                      _uint8(res.images[0]), controlnet)

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
        self.pipe = None

    def step_overhead(self, r: Request) -> float:
        """The engine call becomes a no-op; everything sdtrt does around it (binding, outputs, its NaN
        check) still runs. The outputs the engine no longer writes are zeroed (one small fill per call),
        since uninitialized memory may hold NaN and the pipeline refuses NaN."""
        backend = self.pipe.backend
        if not hasattr(backend, "_execute"):
            return None
        real_run = backend.run

        def run(component, feeds):
            outputs = real_run(component, feeds)
            for out in outputs.values():
                out.zero_()
            return outputs

        backend._execute = lambda *a, **k: None
        backend.run = run
        try:
            res = self.pipe.run(r.replace(steps=max(r.steps, OVERHEAD_STEPS)), progress=False)
        finally:
            del backend._execute, backend.run
        import statistics

        return statistics.median(res.timings["step_seconds"])
