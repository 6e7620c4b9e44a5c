"""`sdtrt bench`: eager diffusers vs Optimum's ONNX Runtime pipeline vs sdtrt, side by side, in one process.

Any text-to-image family sdtrt exports (SD 1.x/2.x, SDXL): each system runs the family's pipeline.
Systems are loaded together and measured interleaved (the default: machine noise hits all alike),
or, for models that do not fit several times in memory, one at a time (load, warm up, measure, unload).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import math
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from .harness import (add_speedups, check_output_path, image_check, load_results, measure, parse_percent, regressions,
                      results_document, write_chart, write_json)
from .systems import DiffusersSystem, OptimumSystem, Request, SdtrtSystem, System, text_to_image_class, unload

ALL_SYSTEMS = ("diffusers", "diffusers-compile", "optimum", "sdtrt", "sdtrt-aoti")
MODES = ("auto", "interleaved", "one-at-a-time")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", nargs="?", type=Path, help="diffusers model folder (or use --preset)")
    p.add_argument("--preset", help="make this preset's model on the fly (cached), e.g. sd15 or tiny")
    p.add_argument("--prompt", action="append", help="prompt (repeat for a batch; default: one fixed prompt per image)")
    p.add_argument("--negative-prompt", default="blurry, low quality", help="negative prompt for every image")
    p.add_argument("--batch", type=int, default=1, help="images per call")
    p.add_argument("--steps", type=int, default=4, help="denoising steps")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, default=256, help="image height in pixels")
    p.add_argument("--width", type=int, default=256, help="image width in pixels")
    p.add_argument("--scheduler", default="euler", help="sampler, any name sdtrt accepts")
    p.add_argument("--seed", type=int, default=0, help="seed (the same for every system)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per system before measuring")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds: interleaved (A B C A B C ...), or one system's after another with --mode one-at-a-time")
    p.add_argument("--systems", default="diffusers,optimum,sdtrt", help=f"comma-separated subset of {', '.join(ALL_SYSTEMS)}")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads for Optimum and sdtrt (0: all cores)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="interleaved: load every system, then measure them in turn (A B C A B C ...), so machine noise hits "
                        "all alike. one-at-a-time: load, warm up, measure and unload each system before the next (peak RSS "
                        "is then per system alone); this loses the interleaving, so timings are more exposed to machine noise: "
                        "it exists for models that do not fit in memory several times over (full-size SDXL: ~13.5 GB fp32 per "
                        "system). auto (default): interleaved, unless the weights times the number of systems exceed the "
                        "available memory (GPU memory too on CUDA); the choice and its reason are logged and written to the JSON")
    p.add_argument("--controlnet", metavar="PRESET_OR_DIR",
                   help="also run a ControlNet (a diffusers ControlNet folder, or a preset such as sd15-controlnet, made and cached): "
                        "diffusers' ControlNet pipeline vs sdtrt, with the ControlNet's time per call (Optimum has no ControlNet pipeline)")
    p.add_argument("--cold-start", type=int, default=0, metavar="N",
                   help="also time N rounds of cold starts: fresh processes for diffusers and sdtrt, import / load / first image "
                        "(sdtrt with and without its cached optimized graphs, and its very first start); see benchmarks/cold_start.py")
    p.add_argument("--work-dir", type=Path, help="where models, ONNX and engines are cached (default: $SDTRT_CACHE/bench)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/bench.json"), help="results JSON")
    p.add_argument("--plot", type=Path, help="per-stage bar chart PNG (default: next to --out)")
    p.add_argument("--no-overhead", action="store_true", help="skip the no-op-UNet runs that measure per-step runtime overhead")
    p.add_argument("--min-psnr", type=float, default=40.0, help="every system's image must be this close to diffusers' (dB)")
    p.add_argument("--compare", type=Path, metavar="BASELINE.json", help="fail if a stage regressed against this earlier result")
    p.add_argument("--max-regression", default="5%", help="allowed slowdown per stage for --compare (e.g. 5%% or 0.05)")


PRESET_SEED = 0  # presets are deterministic: preset name + sdtrt version + this seed name the weights


@dataclasses.dataclass(frozen=True)
class Checked:
    """The flags, checked and parsed before any model is made, loaded or exported."""

    systems: list[str]
    prompts: list[str]
    max_regression: float
    baseline: dict[str, Any] | None
    plot: Path


@dataclasses.dataclass(frozen=True)
class Model:
    """The model under test, named by its content: every cached artifact lives under `cache(work)`,
    a folder keyed by the weights' sha256, never by the folder's name (two models called `tiny` differ)."""

    path: Path
    name: str  # for people: the folder name or preset
    sha256: str  # sdtrt.export.source.weights_sha256 of its weight files
    family: Any  # sdtrt.models.families.Family: which pipeline each system runs
    weight_bytes: int  # the exported networks' weight files on disk: the memory estimate per system

    def cache(self, work: Path) -> Path:
        return work / self.sha256[:16]


def check_args(a: argparse.Namespace) -> Checked:
    """Refuse bad flags up front, each naming the flag: a typo must cost a second, not a whole benchmark."""
    from sdtrt.cli import MAX_SEED, MAX_THREADS
    from sdtrt.errors import SdtrtError
    from sdtrt.runtime.request import MAX_SIDE
    from sdtrt.runtime.schedulers import resolve

    if a.model_dir and a.preset:
        raise SdtrtError("both a model folder and --preset were given.", "pass one of them")
    if not a.model_dir and not a.preset:
        raise SdtrtError("no model to benchmark.", "pass a diffusers folder or --preset sd15 (or tiny)")
    if a.preset:
        try:
            pipeline_class = _presets().get_preset(a.preset).pipeline_class
        except SdtrtError as e:
            raise SdtrtError(e.problem, f"pass --preset with {(e.fix or '').removeprefix('choose ')}") from None
        _check_text_to_image(pipeline_class, f"--preset {a.preset}")
    else:
        from sdtrt.export.source import inspect_source

        src = inspect_source(a.model_dir)  # a diffusers folder sdtrt can export (reads configs only)
        _check_text_to_image(src.pipeline_class, str(a.model_dir))
    wanted = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(ALL_SYSTEMS))
    if unknown:
        raise SdtrtError(f"--systems: unknown system(s) {', '.join(unknown)}.", f"pass --systems with names from {', '.join(ALL_SYSTEMS)}")
    if "diffusers" not in wanted:
        wanted.insert(0, "diffusers")  # the reference every ratio and image is measured against
    for flag, value, least in (("--batch", a.batch, 1), ("--steps", a.steps, 1), ("--repeats", a.repeats, 1),
                               ("--warmup", a.warmup, 0), ("--threads", a.threads, 0)):
        if value < least:
            raise SdtrtError(f"{flag} {value} is less than {least}.", f"pass {flag} {least} or more")
    if a.threads > MAX_THREADS:
        raise SdtrtError(f"--threads {a.threads} is more than {MAX_THREADS}.", "pass --threads 0 (all cores) or the number of cores")
    if not 0 <= a.seed <= MAX_SEED:
        raise SdtrtError(f"--seed {a.seed} is outside 0..{MAX_SEED} (2^64 - 1).", "pass --seed 0 or another seed in that range")
    for flag, value in (("--height", a.height), ("--width", a.width)):
        if value <= 0 or value % 8:
            raise SdtrtError(f"{flag} {value} is not a positive multiple of 8 (the VAE works in 8-pixel blocks).",
                             f"pass {flag} {max(8, value // 8 * 8)} or another positive multiple of 8")
        if value > MAX_SIDE:
            raise SdtrtError(f"{flag} {value} is larger than {MAX_SIDE} (no machine has the memory for more).",
                             f"pass {flag} 512 or another size up to {MAX_SIDE}")
    if not math.isfinite(a.guidance_scale):
        raise SdtrtError(f"--guidance-scale {a.guidance_scale} is not a finite number.", "pass --guidance-scale 7.5 or another finite number")
    if math.isnan(a.min_psnr):
        raise SdtrtError("--min-psnr nan compares false with everything, so it would pass any image.", "pass --min-psnr 40 (dB) or another number")
    try:
        max_reg = parse_percent(a.max_regression)
    except ValueError:
        raise SdtrtError(f"--max-regression {a.max_regression!r} is not a non-negative finite fraction or percentage.",
                         "pass --max-regression 5% (or 0.05)") from None
    try:
        resolve(a.scheduler)
    except SdtrtError as e:
        raise SdtrtError(f"--scheduler: {e.problem}", f"pass --scheduler with {(e.fix or '').removeprefix('choose ')}") from None
    prompts = a.prompt or ["a watercolor painting of a fox in a snowy forest, highly detailed"] * a.batch
    if len(prompts) != a.batch:
        raise SdtrtError(f"{len(prompts)} --prompt for --batch {a.batch}.", "give one --prompt per image, or none")
    check_output_path(a.out, "--out")
    plot = a.plot or a.out.with_suffix(".png")
    check_output_path(plot, "--plot")
    if plot.absolute() == a.out.absolute():
        raise SdtrtError(f"the chart and the results JSON would both be written to {a.out}.", "pass --out FILE.json, or --plot FILE.png")
    baseline = load_results(a.compare, "--compare") if a.compare else None
    return Checked(wanted, prompts, max_reg, baseline, plot)


def _check_text_to_image(pipeline_class: str, what: str) -> None:
    """The bench times text-to-image: an inpainting folder (9-channel UNet) or an SDXL refiner (aesthetic-score
    time ids, no first text encoder) cannot run through its family's text-to-image pipeline."""
    from sdtrt.errors import SdtrtError
    from sdtrt.models import families

    family = next((f for f in families.FAMILIES.values() if pipeline_class in f.pipeline_classes), None)
    if family is not None and pipeline_class != text_to_image_class(family):
        txt2img = [n for n, p in _presets().PRESETS.items() if p.pipeline_class == text_to_image_class(family)]
        raise SdtrtError(f"{what} is a {pipeline_class} model; sdtrt bench times text-to-image ({text_to_image_class(family)}).",
                         f"pass a text-to-image model folder or --preset {' / '.join(txt2img)}")


def _presets():
    from sdtrt.models import presets

    return presets


def _work_dir(a: argparse.Namespace) -> Path:
    from sdtrt.files import cache_dir

    return a.work_dir or cache_dir(instead="--work-dir DIR") / "bench"


def _model(a: argparse.Namespace, work: Path, log) -> Model:
    from sdtrt import __version__
    from sdtrt.export.source import inspect_source, weights_sha256

    if a.model_dir:
        path, name = a.model_dir, a.model_dir.name
    else:
        path, name = work / "presets" / f"{a.preset}-sdtrt{__version__}-seed{PRESET_SEED}", a.preset
        if not (path / "model_index.json").is_file():  # make_model writes all or nothing
            log(f"making the {a.preset} preset in {path} (once)")
            _presets().make_model(a.preset, path, seed=PRESET_SEED, force=True)
    src = inspect_source(path)
    t = time.perf_counter()
    sha = weights_sha256(src.weight_files, path)
    log(f"{name} ({src.family.describe(src.config)}): weights sha256 {sha[:16]} ({time.perf_counter() - t:.1f} s to hash); "
        f"cached work in {work / sha[:16]}")
    return Model(path, name, sha, src.family, sum(f.stat().st_size for f in src.weight_files))


def _reusable(target: Path, model: Model, sha256: str | None = None) -> tuple[Any, str | None]:
    """(the directory, None) if `target` holds sdtrt work made from these weights (`sha256`: the hash its
    sdtrt.json records, by default the model's), else (None, why not). Its metadata is checked, not its
    name: a folder copied or left from other weights is made again."""
    from sdtrt.artifacts import open_model_dir
    from sdtrt.errors import SdtrtError

    if not target.exists():
        return None, "once"
    try:
        found = open_model_dir(target)
    except SdtrtError as e:
        return None, f"again: {e.problem}"
    if found.meta.source.sha256 != (sha256 or model.sha256):
        return None, f"again: it was exported from other weights (sha256 {found.meta.source.sha256[:16]})"
    return found, None


def _onnx_stale(target: Path, model: Model, dtype: str, size: list[int], sha256: str | None = None) -> str | None:
    """Why the ONNX dir at `target` cannot be reused for this model (None: it can)."""
    found, why = _reusable(target, model, sha256)
    if found is not None and (found.meta.dtype, found.meta.default_size) != (dtype, size):
        return "again: it was exported with other options"
    return why


def _controlnet_dir(a: argparse.Namespace, work: Path, log) -> Path | None:
    """--controlnet: a ControlNet folder as given, or a preset made once under the work dir."""
    if not a.controlnet:
        return None
    from sdtrt import __version__

    if Path(a.controlnet).is_dir():
        return Path(a.controlnet)
    path = work / "presets" / f"{a.controlnet}-sdtrt{__version__}-seed{PRESET_SEED}"
    if not (path / "config.json").is_file():
        log(f"making the {a.controlnet} preset in {path} (once)")
        _presets().make_model(a.controlnet, path, seed=PRESET_SEED, force=True)
    return path


def control_image(height: int, width: int):
    """A fixed control image for ControlNet benchmarks: a grid of edges, as a canny map looks."""
    import numpy as np
    from PIL import Image

    grid = np.zeros((height, width, 3), dtype=np.uint8)
    grid[::16, :], grid[:, ::16] = 255, 255
    return Image.fromarray(grid)


def _sdtrt_onnx(model: Model, work: Path, a: argparse.Namespace, dtype: str, log, controlnet: Path | None = None) -> Path:
    from sdtrt.export import export_model
    from sdtrt.files import file_sha256

    # the export validates at (and records as its default) --height x --width, so the size is part of the key
    target = model.cache(work) / f"onnx-{dtype}-{a.height}x{a.width}"
    recorded = None  # with a ControlNet, sdtrt.json records one hash over the model's and the ControlNet's weights
    if controlnet is not None:  # keyed by the ControlNet's weights too
        from sdtrt.export.source import inspect_source, weights_sha256

        weights = sorted(controlnet.glob("*.safetensors"))
        target = target.with_name(target.name + f"-cn{file_sha256(weights[0])[:12] if weights else controlnet.name}")
        recorded = weights_sha256(inspect_source(model.path).weight_files + tuple(weights), model.path)
    why = _onnx_stale(target, model, dtype, [a.height, a.width], recorded)
    if why:
        log(f"exporting {model.name} to {target} ({dtype}, {why})")
        export_model(model.path, target, dtype=dtype, height=a.height, width=a.width, force=True, log=log,
                     controlnets=[(controlnet, "control")] if controlnet is not None else ())
    return target


def _version(*dists: str) -> str:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return "unknown"


@dataclasses.dataclass(frozen=True)
class Planned:
    """A system ready to load: whatever it needs on disk (exports, engines) is made and cached."""

    name: str
    load: Callable[[], System]


def plan_systems(a: argparse.Namespace, checked: Checked, model: Model, work: Path, device, log) -> list[Planned]:
    """Make every export and engine the chosen systems need (before any is loaded: neither their time nor
    their memory belongs to a system's load), and say how to load each."""
    planned: list[Planned] = []
    net = _controlnet_dir(a, work, log)
    for system in checked.systems:
        if system == "diffusers":
            planned.append(Planned("diffusers", functools.partial(DiffusersSystem, model.path, device, model.family, controlnet=net)))
        elif system == "sdtrt-aoti":
            packages = _aoti(model, work, a, device, log)
            planned.append(Planned("sdtrt-aoti", functools.partial(SdtrtSystem, packages, "aoti", device, name="sdtrt-aoti")))
            if device.type == "cuda":
                planned.append(Planned("sdtrt-aoti+graphs", functools.partial(SdtrtSystem, packages, "aoti", device,
                                                                              name="sdtrt-aoti+graphs", cuda_graphs=True)))
        elif system == "diffusers-compile":
            planned.append(Planned("diffusers+compile", functools.partial(DiffusersSystem, model.path, device, model.family, compile_unet=True)))
        elif system == "optimum" and net is not None:
            log("Optimum has no ControlNet pipeline: skipping it for this ControlNet benchmark")
        elif system == "optimum":
            if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.onnxruntime") is None:
                log("optimum-onnx is not installed: skipping it (pip install 'sdtrt[bench]')")
                continue
            if OptimumSystem.pipeline_class(model.family) is None:
                log(f"Optimum {_version('optimum-onnx', 'optimum')} has no ORT{text_to_image_class(model.family)}: skipping it")
                continue
            cache = model.cache(work) / f"optimum-onnx-{_version('optimum-onnx', 'optimum')}"
            OptimumSystem.export(model.path, cache, model.sha256, model.family, log=log)
            planned.append(Planned("optimum-ort", functools.partial(OptimumSystem, cache, device, model.family, a.threads)))
        elif system == "sdtrt":
            onnx32 = _sdtrt_onnx(model, work, a, "fp32", log, net)
            if device.type == "cpu":
                planned.append(Planned("sdtrt-onnxruntime", functools.partial(SdtrtSystem, onnx32, "onnxruntime", device, threads=a.threads)))
            else:
                import onnxruntime

                if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                    onnx16 = _sdtrt_onnx(model, work, a, "fp16", log)
                    planned.append(Planned("sdtrt-onnxruntime-cuda", functools.partial(
                        SdtrtSystem, onnx16, "onnxruntime", device, name="sdtrt-onnxruntime-cuda", device=device)))
                else:
                    log("onnxruntime has no CUDA provider here: skipping sdtrt on ONNX Runtime CUDA (pip install 'sdtrt[onnxruntime-gpu]')")
                engines = _engines(model, work, a, log)
                if engines is not None:
                    planned.append(Planned("sdtrt-tensorrt", functools.partial(SdtrtSystem, engines, "tensorrt", device, device=device)))
    return planned


def load_system(planned: Planned, log) -> tuple[System, dict[str, Any]]:
    """Load one system, with its load time and how much the process grew."""
    import psutil

    proc = psutil.Process()
    before, t = proc.memory_info().rss, time.perf_counter()
    system = planned.load()
    seconds = time.perf_counter() - t
    log(f"loaded {system.name} in {seconds:.1f} s")
    return system, {"load_seconds": round(seconds, 2), "rss_load_delta_mb": round((proc.memory_info().rss - before) / 2**20, 1)}


def available_memory(device) -> tuple[int, str]:
    """(bytes free, which memory) where the systems will live; on CUDA the scarcer of RAM and GPU memory
    (pipelines load on the CPU before they move, and Optimum keeps its ONNX on the host too)."""
    import psutil

    found = [(psutil.virtual_memory().available, "memory")]
    if device.type == "cuda":
        import torch

        found.append((torch.cuda.mem_get_info(device)[0], "GPU memory"))
    return min(found)


def choose_mode(requested: str, per_system: int, systems: int, available: int, where: str = "memory") -> tuple[str, str]:
    """(mode, why). auto is interleaved unless every system's copy of the weights would not fit at once.
    The estimate is the weight files' size per system (fp32 files, fp32 on the CPU; activations come on top)."""
    if requested != "auto":
        return requested, f"--mode {requested}"
    need = per_system * systems
    figures = f"{systems} system{'s' if systems != 1 else ''} x {per_system / 2**30:.1f} GiB of weights = {need / 2**30:.1f} GiB, {where} available {available / 2**30:.1f} GiB"
    if need > available:
        return "one-at-a-time", f"auto: the systems do not fit in memory together ({figures})"
    return "interleaved", f"auto: the systems fit in memory together ({figures})"


def measure_systems(planned: list[Planned], mode: str, request: Request, a: argparse.Namespace, log) -> tuple[dict[str, Any], dict[str, Any]]:
    """(measurements, load figures) for every planned system, loaded together or one at a time."""
    import psutil

    load: dict[str, Any] = {}
    if mode == "interleaved":
        systems = []
        for p in planned:
            system, info = load_system(p, log)
            load[system.name] = info
            systems.append(system)
        return measure(systems, request, a.warmup, a.repeats, overhead=not a.no_overhead, log=log), load
    measured: dict[str, Any] = {"systems": {}, "images": {}}
    for p in planned:
        system, info = load_system(p, log)
        try:
            part = measure([system], request, a.warmup, a.repeats, overhead=not a.no_overhead, log=log)
        finally:
            unload(system)
        rss = psutil.Process().memory_info().rss / 2**20
        load[system.name] = {**info, "rss_after_unload_mb": round(rss, 1)}
        log(f"unloaded {system.name}: RSS {rss:.0f} MB")
        measured["systems"].update(part["systems"])
        measured["images"].update(part["images"])
    return measured, load


def _aoti(model: Model, work: Path, a: argparse.Namespace, device, log) -> Path:
    """AOTInductor packages for this model, size and batch (fp16 on a GPU, fp32 on the CPU), compiled once and
    reused while their engines.json names these weights and this torch."""
    import torch

    from sdtrt.engines.aoti import build_aoti, device_target

    dtype = "fp16" if device.type == "cuda" else "fp32"
    target = model.cache(work) / f"aoti-{torch.__version__}-{device_target(device)}-{dtype}-{a.height}x{a.width}-b{a.batch}"
    found, why = _reusable(target, model)
    if found is None or found.kind != "engines":
        log(f"compiling AOTInductor packages in {target} ({why or 'again'})")
        build_aoti(model.path, target, device=str(device), dtype=dtype, batch=f"1:{a.batch}:{a.batch}", height=str(a.height),
                   width=str(a.width), force=True, log=log)
    return target


def _engines(model: Model, work: Path, a: argparse.Namespace, log) -> Path | None:
    from sdtrt.engines.build import build_engines
    from sdtrt.engines.toolkit import RTX_TARGETS, load_toolkit, local_gpu_target

    gpu = local_gpu_target()
    library = "tensorrt" if importlib.util.find_spec("tensorrt") else (
        "tensorrt-rtx" if importlib.util.find_spec("tensorrt_rtx") and gpu in RTX_TARGETS else None)
    if library is None:
        log("no TensorRT library can build for this GPU here: skipping sdtrt on TensorRT")
        return None
    # an engine is for one library version and GPU, and its profile is fixed by the flags
    target = model.cache(work) / f"engines-{library}-{load_toolkit(library).version}-{gpu}-{a.height}x{a.width}-b{a.batch}"
    found, why = _reusable(target, model)
    if found is None or found.kind != "engines":
        log(f"building {library} engines in {target} ({why or 'again: it holds no engines'})")
        build_engines(_sdtrt_onnx(model, work, a, "fp16", log), target, backend=library, batch=str(a.batch),
                      height=str(a.height), width=str(a.width), force=True, log=log)
    return target


def run(a: argparse.Namespace, log=print) -> int:
    import torch

    from sdtrt.errors import SdtrtError

    checked = check_args(a)  # before anything is made, loaded or exported
    device = torch.device("cuda" if (a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())) else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdtrtError("--device cuda but no GPU is visible.", "use --device cpu")
    work = _work_dir(a)
    model = _model(a, work, log)
    prompts = checked.prompts
    # one sdtrt.Request for every system; the guidance scale is always explicit (the families' defaults differ:
    # SD 7.5, SDXL 5.0), and the scheduler is the same class for all (sdtrt names map to diffusers classes)
    request = Request(prompts, [a.negative_prompt] * len(prompts), steps=a.steps, guidance_scale=a.guidance_scale,
                      height=a.height, width=a.width, scheduler=a.scheduler, seed=a.seed).check()
    if a.controlnet:  # the same control image and scale for diffusers' ControlNet pipeline and sdtrt
        request = request.replace(control_image=control_image(a.height, a.width), controlnet_conditioning_scale=1.0).check()
    planned = plan_systems(a, checked, model, work, device, log)
    available, where = available_memory(device)
    mode, why = choose_mode(a.mode, model.weight_bytes, len(planned), available, where)
    log(f"mode {mode}: {why}")
    if mode == "one-at-a-time" and model.weight_bytes > available:
        log(f"warning: even one system's weights ({model.weight_bytes / 2**30:.1f} GiB) exceed the {where} available "
            f"({available / 2**30:.1f} GiB); expect swapping or an out-of-memory kill")
    measured, load = measure_systems(planned, mode, request, a, log)
    add_speedups(measured)
    report = image_check(measured["images"], a.min_psnr)
    config = {"steps": a.steps, "guidance_scale": a.guidance_scale, "height": a.height, "width": a.width, "scheduler": a.scheduler,
              "seed": a.seed, "prompts": prompts, "negative_prompt": a.negative_prompt, "batch": a.batch, "warmup": a.warmup,
              "repeats": a.repeats, "threads": a.threads, "device": str(device), "mode": mode, "mode_reason": why,
              "model_dir": str(model.path), "model_name": model.name, "family": model.family.name,
              "weights_sha256": model.sha256, "weights_mb": round(model.weight_bytes / 2**20, 1), "systems": list(measured["systems"]),
              "controlnet": a.controlnet}
    doc = results_document(measured, config, report, load)
    if a.cold_start:
        doc["cold_start"] = cold_start(a, model, planned, device, work, log)
    write_json(doc, a.out)
    log(f"wrote {a.out}")
    log(f"wrote {write_chart(doc, checked.plot)}")
    log(table(doc))
    status = 0
    if not report["ok"]:
        log("IMAGES DIFFER: " + "; ".join(report["failures"]))
        status = 3
    if checked.baseline is not None:
        earlier = checked.baseline.get("config")
        before = earlier.get("mode", "interleaved") if isinstance(earlier, dict) else "interleaved"  # results older than --mode were interleaved
        if before != mode:
            log(f"note: {a.compare} was measured {before}, this run {mode}: timings may differ by mode alone")
        found = regressions(doc, checked.baseline, checked.max_regression)
        if found:
            log("REGRESSION: " + "; ".join(found))
            status = status or 4
        else:
            log(f"no stage regressed more than {a.max_regression} against {a.compare}")
    return status


def cold_start(a: argparse.Namespace, model: Model, planned: list[Planned], device, work: Path, log) -> dict[str, Any]:
    """Fresh processes for diffusers and the first sdtrt system, after the in-process measurement (whose
    systems are unloaded by then, so the two do not share the machine's memory)."""
    from . import cold_start as cs

    ours = next((p for p in planned if p.name.startswith("sdtrt")), None)
    if ours is None or not any(p.name == "diffusers" for p in planned):
        log("--cold-start needs diffusers and sdtrt among --systems: skipping it")
        return {}
    if a.controlnet or a.batch != 1 or len(set(a.prompt or [])) > 1:
        log("--cold-start times one plain text-to-image call (no ControlNet, batch 1)")
    path = ours.load.args[0]
    request = cs.request_for(a.steps, a.height, a.width, device.type, a.guidance_scale, a.seed)
    doc = cs.measure(model.path, path, model.family.pipeline_classes[0], request, a.cold_start, work / "cold-start-cache", log)
    log(cs.summary(doc))
    return {"system": ours.name, **doc}


def table(doc: dict[str, Any]) -> str:
    head = f"{'system':<26}{'end-to-end':>12}{'text enc':>10}{'UNet/call':>11}{'VAE dec':>10}{'x diffusers':>12}{'overhead/step':>15}{'PSNR':>8}"
    rows = [head, "-" * len(head)]
    psnrs = doc["same_image"]["psnr_db"]
    for name, e in doc["systems"].items():
        s = e["summary"]
        p = "ref" if name == "diffusers" else ("inf" if psnrs.get(name) is None else f"{psnrs[name]:.1f}")
        oh = f"{e['step_overhead_ms']:.3f} ms" if "step_overhead_ms" in e else "-"
        cn = f"  ControlNet/call {s['controlnet_per_call']['median']:.3f}s" if "controlnet_per_call" in s else ""
        rows.append(f"{name:<26}{s['end_to_end']['median']:>11.3f}s{s['text_encoder']['median']:>9.3f}s{s['unet_per_call']['median']:>10.3f}s"
                    f"{s['vae_decoder']['median']:>9.3f}s{e.get('speedup_vs_diffusers', {}).get('end_to_end', 1.0):>11.2f}x{oh:>15}{p:>8}{cn}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sdtrt bench")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
