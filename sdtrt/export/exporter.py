"""`sdtrt export`: a diffusers folder in, a validated ONNX directory (with sdtrt.json) out."""

from __future__ import annotations

import gc
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable

import torch

from .. import __version__
from ..files import atomic_dir, check_output_dir, file_sha256
from ..components import COMPONENTS, DEFAULT_COMPONENTS, VAE_FACTOR, nearest_sizes, sizes_for
from ..errors import SdtrtError, require
from ..progress import progress
from . import graph, validate
from .source import SourceModel, inspect_source, load_modules, weights_sha256
from .wrappers import clip_skip_max, wrap

METADATA = "sdtrt.json"
FORMAT_VERSION = 1
DTYPES = ("fp32", "fp16")


def component_dtypes(components: Iterable[str], dtype: str, fp16_vae: bool) -> dict[str, str]:
    """fp16 applies to the text encoder and UNet; the VAE overflows in fp16, so it stays fp32 unless asked."""
    return {c: dtype if (not c.startswith("vae") or fp16_vae) else "fp32" for c in components}


def sample_inputs(component: str, src: SourceModel, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Real-shaped fp32 inputs: 77 tokens, latents of the requested resolution, CFG batch of 2."""
    g = torch.Generator().manual_seed(seed)
    sizes = sizes_for(1, height, width, text_dim=src.text_dim, unet_in_channels=src.unet_in_channels)
    if component == "text_encoder":
        ids = torch.randint(0, 49406, (2, 77), generator=g, dtype=torch.int32)
        ids[:, 0] = 49406
        ids[0, 12:] = 49407  # a short prompt: eos then padding
        ids[1, 76] = 49407  # a full-length prompt
        return (ids,)
    if component == "unet":
        return (
            torch.randn(2, sizes["Cin"], sizes["h"], sizes["w"], generator=g),
            torch.tensor([801.0]),
            torch.randn(2, 77, src.text_dim, generator=g),
        )
    if component == "vae_decoder":
        return (torch.randn(1, 4, sizes["h"], sizes["w"], generator=g),)
    if component == "vae_encoder":
        return (torch.rand(1, 3, height, width, generator=g) * 2 - 1,)
    raise KeyError(component)


def trace_size(src: SourceModel) -> int:
    """Image side (px) to trace the UNet at: latents of 2^(levels-1) + 1, deliberately not a multiple
    of the UNet's total down-sampling. diffusers then upsamples to each skip connection's exact
    size (a Resize whose size comes from the graph) instead of by a fixed x2, so the exported UNet
    takes every multiple of 8 px, as diffusers does, not only multiples of 64."""
    levels = len(src.unet_config.get("block_out_channels", [0, 0, 0, 0]))
    return VAE_FACTOR * (2 ** (levels - 1) + 1)


def _cast(inputs: tuple[torch.Tensor, ...], dtype: str) -> tuple[torch.Tensor, ...]:
    if dtype == "fp32":
        return inputs
    # timestep stays float32 in every precision (it is a 1-element tensor; fp16 would round it)
    return tuple(x.half() if x.is_floating_point() and x.numel() > 1 else x for x in inputs)


def check_components(components: Iterable[str]) -> list[str]:
    out = list(dict.fromkeys(components))
    unknown = [c for c in out if c not in COMPONENTS]
    if unknown or not out:
        raise SdtrtError(f"unknown component(s): {', '.join(unknown) or '(none given)'}.",
                         f"choose from: {', '.join(COMPONENTS)} (default: {','.join(DEFAULT_COMPONENTS)})")
    return out


def check_size(height: int, width: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % VAE_FACTOR:
            raise SdtrtError(f"--{name} {v} is not a positive multiple of {VAE_FACTOR}.", f"use --{name} {nearest_sizes(max(v, 1))}")


def export_model(
    model_dir: Path,
    out: Path,
    components: Iterable[str] = DEFAULT_COMPONENTS,
    dtype: str = "fp32",
    opset: int = graph.DEFAULT_OPSET,
    force: bool = False,
    validate_outputs: bool = True,
    height: int | None = None,
    width: int | None = None,
    fp16_vae: bool = False,
    allow_pickle: bool = False,
    external_data_threshold: int = graph.EXTERNAL_DATA_THRESHOLD,
    show_progress: bool = True,
    log=print,
) -> Path:
    """Export, clean and validate each component into `out`; returns `out`. All or nothing."""
    require("onnx", "export", "sdtrt export")
    require("onnxruntime", "export", "sdtrt export")
    names = check_components(components)
    if dtype not in DTYPES:
        raise SdtrtError(f"unknown dtype '{dtype}'.", "pass --dtype fp32 or --dtype fp16")
    graph.check_opset(opset)
    out = Path(out)
    check_output_dir(out, force)
    src = inspect_source(model_dir, allow_pickle)
    height = height or src.default_size
    width = width or src.default_size
    check_size(height, width)
    dtypes = component_dtypes(names, dtype, fp16_vae)
    if not validate_outputs:
        log("WARNING: --no-validate: the ONNX files are NOT checked against the torch model.")

    started = time.time()
    meta_components: dict[str, dict] = {}
    checks: list[validate.Check] = []
    with atomic_dir(out, force) as tmp:
        bar = progress(total=len(names) * 3, desc="export", disable=not show_progress)
        for name in names:
            spec = COMPONENTS[name]
            t0 = time.time()
            bar.set_postfix_str(f"{name}: trace ({dtypes[name]})")
            inputs = sample_inputs(name, src, height, width)
            # One component's torch module at a time, freed before the graph work: a full-size UNet
            # is 3.4 GB in fp32 and the ONNX clean-up holds copies of the graph.
            module = wrap(name, load_modules(src, {name}), src.text_config)
            expected = validate.reference_outputs(module, inputs) if validate_outputs else None
            if dtypes[name] == "fp16":
                module = module.half()
            raw = tmp / ".raw" / name / "model.onnx"
            # Traced at a small size: the graph is the same at every size (dynamic axes), and tracing
            # runs the module once, which in fp16 on a CPU takes many minutes at 512 x 512.
            side = trace_size(src) if name == "unet" else 64
            graph.torch_to_onnx(module, _cast(sample_inputs(name, src, side, side, seed=1), dtypes[name]), spec, raw, opset)
            del module
            gc.collect()
            bar.update()
            bar.set_postfix_str(f"{name}: clean graph")
            final = tmp / name / "model.onnx"
            external = graph.clean_and_save(raw, final, spec, external_data_threshold)
            graph.remove(raw.parent)
            bar.update()
            if validate_outputs:
                bar.set_postfix_str(f"{name}: validate in ONNX Runtime")
                found = validate.compare_outputs(spec, dtypes[name], final, inputs, expected)
                checks += found
                validate.raise_on_failure(found)
            bar.update()
            meta_components[name] = {
                "path": f"{name}/model.onnx",
                "dtype": dtypes[name],
                "external_data": external,
                "sha256": file_sha256(final),
                "inputs": {t.name: {"dims": list(t.dims), "dtype": t.concrete_dtype(dtypes[name])} for t in spec.inputs},
                "outputs": {t.name: {"dims": list(t.dims), "dtype": t.concrete_dtype(dtypes[name])} for t in spec.outputs},
                "export_seconds": round(time.time() - t0, 2),
            }
        bar.close()
        graph.remove(tmp / ".raw")
        shutil.copytree(src.path / "tokenizer", tmp / "tokenizer")
        shutil.copytree(src.path / "scheduler", tmp / "scheduler")
        meta = metadata(src, meta_components, dtype, opset, height, width, checks, time.time() - started)
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")  # written last: its presence means complete
    if checks:
        log(validate.format_table(checks))
    return out


def metadata(src: SourceModel, components: dict, dtype: str, opset: int, height: int, width: int,
             checks: list[validate.Check], seconds: float) -> dict:
    tok_cfg = json.loads((src.path / "tokenizer" / "tokenizer_config.json").read_text())
    sched = {k: v for k, v in src.scheduler_config.items() if not k.startswith("_diffusers")}
    return {
        "format": "sdtrt-onnx",
        "format_version": FORMAT_VERSION,
        "sdtrt_version": __version__,
        "torch_version": torch.__version__,
        "family": src.family,
        "pipeline_class": src.pipeline_class,
        "source": {"path": str(src.path.absolute()), "sha256": weights_sha256(src.weight_files, src.path)},
        "dtype": dtype,
        "opset": opset,
        "components": components,
        "text_embedding_dim": src.text_dim,
        "clip_skip_max": clip_skip_max(src.text_config),
        "unet_in_channels": src.unet_in_channels,
        "latent_channels": int(src.vae_config.get("latent_channels", 4)),
        "vae_scale_factor": VAE_FACTOR,
        "vae_scaling_factor": float(src.vae_config.get("scaling_factor", 0.18215)),
        "prediction_type": sched.get("prediction_type", "epsilon"),
        "scheduler_config": sched,
        "tokenizer": {
            "dir": "tokenizer",
            "files": sorted(p.name for p in (src.path / "tokenizer").iterdir()),
            "pad_token": tok_cfg.get("pad_token"),
            "model_max_length": tok_cfg.get("model_max_length", 77),
        },
        "default_size": [height, width],
        "validation": [dict(vars(c), ok=c.ok) for c in checks],
        "export_seconds": round(seconds, 1),
        "python": sys.version.split()[0],
    }
