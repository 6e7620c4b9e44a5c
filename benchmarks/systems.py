"""The systems a benchmark compares. Each loads once, then runs the same request, reporting
per-stage seconds (text encoder, UNet per call, VAE decode), end-to-end seconds and the image.

Stage times for diffusers and Optimum come from wrapping their components' forward methods with
timers (synchronizing CUDA first on a GPU), so every system is timed at the same boundaries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


@dataclasses.dataclass
class Request:
    prompts: list[str]
    negative_prompts: list[str]
    steps: int
    guidance_scale: float
    height: int
    width: int
    scheduler: str
    seed: int


@dataclasses.dataclass
class Sample:
    end_to_end: float
    text_encoder: float
    unet_per_call: float
    unet_calls: int
    vae_decoder: float
    image: np.ndarray  # uint8 [H,W,3] of the first image


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

    def run(self, r: Request) -> Sample:
        raise NotImplementedError

    def step_overhead(self, r: Request) -> float | None:
        """Seconds per denoising step spent outside the UNet itself (UNet replaced by a no-op)."""
        return None


class _DiffusersPipelineSystem(System):
    """Eager diffusers and Optimum both run diffusers' pipeline code over their own components:
    scheduler swap, call, stage timers and the no-op-engine overhead run are shared here."""

    pipe: Any
    timers: _Timers

    def _instrument(self, text_encoder, unet, vae_decode_owner, vae_decode_attr: str) -> None:
        self.timers = _Timers(_sync_for(self.device))
        text_encoder.forward = self.timers.wrap("text_encoder", text_encoder.forward)
        unet.forward = self.timers.wrap("unet", unet.forward)
        setattr(vae_decode_owner, vae_decode_attr, self.timers.wrap("vae_decoder", getattr(vae_decode_owner, vae_decode_attr)))
        self._scheduler_config = dict(self.pipe.scheduler.config)

    def _call(self, r: Request, **extra):
        import diffusers

        from sdtrt.runtime import schedulers as S

        cls = getattr(diffusers, S.diffusers_class_name(r.scheduler))
        self.pipe.scheduler = cls.from_config(self._scheduler_config, **S.implied_overrides(r.scheduler))
        gen = torch.Generator("cpu").manual_seed(r.seed)
        with torch.inference_mode():
            return self.pipe(r.prompts, negative_prompt=r.negative_prompts, num_inference_steps=r.steps, guidance_scale=r.guidance_scale,
                             height=r.height, width=r.width, generator=gen, **extra)

    def run(self, r: Request) -> Sample:
        self.timers.reset()
        sync = _sync_for(self.device)
        sync()
        t = time.perf_counter()
        out = self._call(r)
        sync()
        total = time.perf_counter() - t
        s, c = self.timers.seconds, self.timers.calls
        return Sample(total, s.get("text_encoder", 0.0), s["unet"] / c["unet"], c["unet"], s["vae_decoder"], _uint8(out.images[0]))

    def _noop_engine(self):
        """A context manager during which the UNet's engine call costs nothing."""
        raise NotImplementedError

    def step_overhead(self, r: Request) -> float:
        stamps: list[float] = []

        def on_step_end(pipe, i, t, kwargs):
            stamps.append(time.perf_counter())
            return kwargs

        with self._noop_engine():
            self._call(dataclasses.replace(r, steps=max(r.steps, OVERHEAD_STEPS)), callback_on_step_end=on_step_end)
        return _median_interval(stamps)


class DiffusersSystem(_DiffusersPipelineSystem):
    """Eager diffusers: fp32 on CPU; fp16 with SDPA on CUDA (optionally torch.compile'd UNet)."""

    def __init__(self, model_dir: Path, device: torch.device, compile_unet: bool = False):
        from diffusers import StableDiffusionPipeline
        from diffusers.models.attention_processor import AttnProcessor2_0

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        self.name = "diffusers" + ("+compile" if compile_unet else "")
        self.device = device
        self.pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype).to(device)
        self.pipe.unet.set_attn_processor(AttnProcessor2_0())  # SDPA
        self.pipe.set_progress_bar_config(disable=True)
        if compile_unet:
            self.pipe.unet = torch.compile(self.pipe.unet)
        p = self.pipe
        self._instrument(p.text_encoder, p.unet, p.vae, "decode")

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
    """Optimum's ONNX Runtime Stable Diffusion pipeline, exporting its own ONNX from the same folder."""

    SOURCE = "sdtrt-bench-source.json"  # written into the export: the weights it came from

    def __init__(self, model_dir: Path, device: torch.device, cache: Path, weights_sha256: str, threads: int = 0, log=print):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        self.name = "optimum-ort"
        self.device = device
        provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if self.exported_from(cache) != weights_sha256:
            from sdtrt.files import atomic_dir

            log(f"exporting with Optimum to {cache} (once)")
            with atomic_dir(cache, force=True) as tmp:  # all or nothing: a killed export is never reused
                ORTStableDiffusionPipeline.from_pretrained(str(model_dir), export=True).save_pretrained(str(tmp))
                (tmp / self.SOURCE).write_text(json.dumps({"path": str(Path(model_dir).absolute()), "sha256": weights_sha256}) + "\n")
        self.pipe = ORTStableDiffusionPipeline.from_pretrained(str(cache), provider=provider, session_options=options)
        self.pipe.set_progress_bar_config(disable=True)
        p = self.pipe
        self._instrument(p.text_encoder, p.unet, p.vae_decoder, "forward")

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
    """sdtrt's runtime on one backend (ONNX Runtime on an ONNX dir, TensorRT on an engine dir)."""

    def __init__(self, path: Path, backend: str, device: torch.device, name: str | None = None, **options: Any):
        from sdtrt import Pipeline

        self.name = name or f"sdtrt-{backend}"
        self.device = device
        self.pipe = Pipeline.load(path, backend=backend, **options)

    def _call(self, r: Request):
        return self.pipe(r.prompts, negative_prompt=r.negative_prompts, steps=r.steps, guidance_scale=r.guidance_scale,
                         height=r.height, width=r.width, scheduler=r.scheduler, seed=r.seed, progress=False)

    def run(self, r: Request) -> Sample:
        res = self._call(r)
        t = res.timings
        return Sample(t["total"], t["text_encoder"], t["unet"] / t["unet_calls"], int(t["unet_calls"]), t["vae_decoder"], _uint8(res.images[0]))

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
            res = self._call(dataclasses.replace(r, steps=max(r.steps, OVERHEAD_STEPS)))
        finally:
            del backend._execute, backend.run
        import statistics

        return statistics.median(res.timings["step_seconds"])
