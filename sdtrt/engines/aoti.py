"""`sdtrt build --backend aoti`: each component compiled ahead of time by torch.export + AOTInductor into
a `.pt2` package, for machines without TensorRT (CPU servers, AMD ROCm, CUDA versions TensorRT does not
support yet). The packages run in `sdtrt.runtime.backends.aoti`; the rest of the runtime is unchanged.

Input: an ONNX directory (its recorded source model is compiled, its metadata reused) or a diffusers
folder. Dynamic ranges work like TensorRT profiles (--batch images, --height/--width pixels; the UNet
takes B..2B_max, the text encoders prompts + negatives): every symbolic dimension becomes a
`torch.export.Dim` with those bounds, and a request outside them is refused naming the range and flag.
engines.json records torch's version, the device (and GPU compute capability) and each package's
sha256; the runtime checks them before loading.
"""

from __future__ import annotations

import datetime
import resource
import shutil
import time
from pathlib import Path
from typing import Iterable

import torch

from .. import __version__
from ..artifacts import EngineFile, EngineManifest, ExportMeta, Library, Source, Tokenizer, open_model_dir
from ..errors import SdtrtError
from ..files import atomic_dir, check_not_inside, check_output_dir, file_sha256
from ..models.spec import ComponentSpec
from ..progress import progress
from .profiles import Ranges, symbol_sizes


def device_target(device: torch.device) -> str:
    """'cpu', or 'cuda-sm90' style: what a package was compiled for."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    return device.type


def build_aoti(source: Path, out: Path, device: str = "cpu", dtype: str | None = None, batch: str = "1:1:4",
               height: str | None = None, width: str | None = None, components: Iterable[str] | None = None,
               max_prompt_chunks: int = 1, fp16_vae: bool = False, force: bool = False, show_progress: bool = True,
               log=print) -> Path:
    """Compile every component into `out` (all or nothing); returns `out`."""
    from ..export.exporter import component_dtypes
    from ..export.source import weights_sha256

    target_device = _device(device)
    meta, src = _source(Path(source))
    check_not_inside(out, source, "model folder")
    dtype = dtype or meta.dtype
    if dtype not in ("fp32", "fp16"):
        raise SdtrtError(f"unknown dtype {dtype!r}.", "pass dtype='fp32' or 'fp16'", cli_fix="pass --dtype fp32 or --dtype fp16")
    if dtype == "fp16" and target_device.type == "cpu":
        raise SdtrtError("fp16 on a CPU is slower than fp32 and loses precision.", "use dtype='fp32' on a CPU",
                         cli_fix="drop --dtype fp16 for --device cpu")
    specs = src.specs
    names = list(dict.fromkeys(components)) if components else list(meta.components or src.family.default_components(src.config))
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SdtrtError(f"unknown component(s) {', '.join(unknown)}.", f"choose from {', '.join(specs)}",
                         cli_fix=f"pass --components with some of: {', '.join(specs)}")
    derived = [n for n in names if any("/" in str(d) for t in specs[n].inputs for d in t.dims)]
    if derived:
        raise SdtrtError(f"{', '.join(derived)} take inputs whose sizes are ceil(h / 2^k) (ControlNet residuals), which "
                         "torch.export cannot bound; the aoti backend does not build them yet.",
                         "build ControlNet exports for ONNX Runtime or TensorRT", cli_fix="use --backend tensorrt-rtx for a ControlNet export")
    native = meta.default_size
    ranges = Ranges.parse(batch, height or str(native[0]), width or str(native[1]), max_prompt_chunks)
    dtypes = component_dtypes([specs[n] for n in names], dtype, fp16_vae)
    out = Path(out)
    check_output_dir(out, force)
    started = time.time()
    entries: dict[str, EngineFile] = {}
    with atomic_dir(out, force) as tmp:
        bar = progress(total=len(names), desc="aoti", disable=not show_progress, unit="component")
        for name in names:
            bar.set_postfix_str(f"{name}: export + compile ({dtypes[name]}, {target_device})")
            entries[name] = _compile(specs[name], src, ranges, dtypes[name], target_device, tmp, log)
            bar.update()
        bar.close()
        for folder in [t.dir for t in meta.tokenizers.values()] + ["scheduler"]:
            shutil.copytree(src.path / folder, tmp / folder)
        meta.write(tmp)
        EngineManifest(
            backend=Library("aoti", "torch", torch.__version__), targets=[device_target(target_device)],
            flags={"batch": str(ranges.batch), "height": str(ranges.height), "width": str(ranges.width),
                   "max_prompt_chunks": ranges.prompt_chunks, "dtype": dtype, "device": str(target_device)},
            engines=entries, onnx_dir=str(Path(source).absolute()), weights_sha256=weights_sha256(src.weight_files, src.path),
            sdtrt_version=__version__, build_machine_gpu=device_target(target_device) if target_device.type == "cuda" else None,
            built_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            build_seconds=round(time.time() - started, 2),
            peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        ).write(tmp)
    return out


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise SdtrtError(f"{text!r} is not a device.", "pass 'cpu' or 'cuda'", cli_fix="pass --device cpu or --device cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdtrtError("--device cuda, but no GPU is visible.", "compile on the GPU machine, or for device='cpu'",
                         cli_fix="pass --device cpu, or run this on the GPU machine")
    if device.type not in ("cpu", "cuda"):
        raise SdtrtError(f"AOTInductor here compiles for cpu or cuda, not {device.type}.", "pass 'cpu' or 'cuda'",
                         cli_fix="pass --device cpu or --device cuda")
    return device


def _source(path: Path):
    """(sdtrt metadata, the source model) from an ONNX dir (its recorded source, checked by hash) or a diffusers folder."""
    from ..export.source import inspect_source, weights_sha256

    if (path / "sdtrt.json").is_file():
        meta = open_model_dir(path).meta
        src = inspect_source(Path(meta.source.path))
        if weights_sha256(src.weight_files, src.path) != meta.source.sha256:
            raise SdtrtError(f"the model {meta.source.path} changed since {path} was exported from it.",
                             "re-export it, or pass the diffusers folder itself", cli_fix=f"pass the diffusers folder: sdtrt build {meta.source.path} --backend aoti ...")
        if meta.adapters or meta.config.get("controlnets"):
            raise SdtrtError(f"{path} has adapters merged or ControlNets; the aoti backend compiles the plain source model.",
                             "compile the diffusers folder", cli_fix=f"pass the diffusers folder: sdtrt build {meta.source.path} --backend aoti ...")
        return meta, src
    src = inspect_source(path)
    tokenizers = {e: Tokenizer(src.family.tokenizer_folder(e), sorted(p.name for p in (path / src.family.tokenizer_folder(e)).iterdir()))
                  for e in src.family.present_text_encoders(src.config)}
    meta = ExportMeta(family=src.family.name, pipeline_class=src.pipeline_class, config=src.config, components={},
                      tokenizers=tokenizers, scheduler_config=src.scheduler_config,
                      source=Source(str(path.absolute()), weights_sha256(src.weight_files, src.path)), dtype="fp32", opset=0,
                      default_size=list(src.default_size), sdtrt_version=__version__, torch_version=torch.__version__)
    return meta, src


def _dims(spec: ComponentSpec, ranges: Ranges) -> tuple[tuple, dict[str, int]]:
    """(dynamic_shapes for torch.export, the example sizes): one Dim per symbol, shared by every input
    that has it; static where min == max. Examples avoid sizes 0 and 1, which torch.export specializes."""
    low, high, opt = (symbol_sizes(ranges, w, spec.latent_factor) for w in ("min", "max", "opt"))
    dims, example = {}, {}
    for symbol in {d for t in spec.inputs for d in t.dims if isinstance(d, str)}:
        lo, hi = low[symbol], high[symbol]
        example[symbol] = min(max(opt[symbol], 2), hi) if hi > 1 else hi
        if lo < hi:
            dims[symbol] = torch.export.Dim(symbol, min=lo, max=hi)
    shapes = tuple({i: dims[d] for i, d in enumerate(t.dims) if isinstance(d, str) and d in dims} or None for t in spec.inputs)
    return shapes, example


def _example(spec: ComponentSpec, sizes: dict[str, int], dtype: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    from ..export.exporter import _cast, _sample

    g = torch.Generator().manual_seed(1)
    inputs = tuple(_sample(spec, t, t.shape(sizes), g) for t in spec.inputs)
    return tuple(x.to(device) for x in _cast(inputs, dtype))


def _compile(spec: ComponentSpec, src, ranges: Ranges, dtype: str, device: torch.device, tmp: Path, log) -> EngineFile:
    module = spec.load(src.path, src.pickle_weights)
    unet = getattr(module, "unet", None)
    if unet is not None and hasattr(unet, "num_upsamplers"):
        # Every size takes diffusers' exact-size up-sampling path (as the ONNX trace does), so export
        # sees no branch on h % 2^levels and one program serves every size in the range.
        unet.num_upsamplers = 64
    module = (module.half() if dtype == "fp16" else module).to(device).eval()
    shapes, example = _dims(spec, ranges)
    args = _example(spec, example, dtype, device)
    t0 = time.time()
    with torch.no_grad():
        try:
            exported = torch.export.export(module, args, dynamic_shapes=shapes)
        except Exception as e:  # noqa: BLE001 - torch.export reports unsupported graphs with many exception types
            raise SdtrtError(f"torch.export could not export {spec.name} for these ranges: {str(e).splitlines()[0][:300]}",
                             "narrow the ranges or use static sizes", cli_fix="narrow --batch/--height/--width (or give one value each)") from None
        path = tmp / f"{spec.name}.pt2"
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path))
    seconds = time.time() - t0
    log(f"{spec.name}: compiled in {seconds:.1f}s")
    profile = {t.name: [list(t.shape(symbol_sizes(ranges, w, spec.latent_factor))) for w in ("min", "opt", "max")] for t in spec.inputs}
    del module, exported
    return EngineFile(path=path.name, dtype=dtype, sha256=file_sha256(path), size_bytes=path.stat().st_size, onnx_sha256="",
                      cache_key="", profile=profile, build_seconds=round(seconds, 2), layers={})
