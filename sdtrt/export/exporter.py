"""`sdtrt export`: a diffusers folder in, a validated ONNX directory (with sdtrt.json) out."""

from __future__ import annotations

import dataclasses
import gc
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .. import __version__
from ..artifacts import AdapterRecord, ExportMeta, OnnxFile, Source, Tokenizer
from ..errors import SdtrtError, require
from ..files import atomic_dir, check_not_inside, check_output_dir, file_sha256
from ..models.families.base import read_json
from ..models.spec import VAE_FACTOR, ComponentSpec, TensorSpec, nearest_sizes, sizes_for
from ..progress import progress
from . import graph, validate
from .source import MAKE_ONE, SourceModel, inspect_source, weights_sha256

DTYPES = ("fp32", "fp16")


def component_dtypes(specs: Sequence[ComponentSpec], dtype: str, fp16_vae: bool) -> dict[str, str]:
    """--dtype fp16 applies to networks that tolerate it; VAEs overflow in fp16, so they stay fp32 unless asked."""
    return {s.name: dtype if (s.fp16 or fp16_vae) else "fp32" for s in specs}


def sample_inputs(spec: ComponentSpec, height: int, width: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Real-shaped fp32 inputs: 77 tokens, latents of the requested size, a guidance batch of 2."""
    g = torch.Generator().manual_seed(seed)
    sizes = sizes_for(1, height, width, latent_factor=spec.latent_factor)
    return tuple(_sample(spec, t, t.shape(sizes), g) for t in spec.inputs)


def _sample(spec: ComponentSpec, t: TensorSpec, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if t.sample == "ids":
        low, bos, eos = spec.ids_range
        ids = torch.randint(low, bos, shape, generator=g, dtype=torch.int32)
        ids[:, 0] = bos
        ids[0, 12:] = eos  # a short prompt: eos then padding
        ids[-1, -1] = eos  # a full-length prompt
        return ids
    if t.sample == "timestep":
        return torch.tensor([801.0])
    if t.sample == "image":
        return torch.rand(shape, generator=g) * 2 - 1
    if t.sample in spec.sample_values:  # fixed values per row (time ids [B2,N]; class labels [B2])
        values = torch.tensor(spec.sample_values[t.sample], dtype=torch.float32)
        x = values.expand(shape) if len(shape) == 1 else values[None].expand(shape)
        return x.contiguous().to(_INT_DTYPES.get(t.dtype, torch.float32))
    return torch.randn(shape, generator=g)


_INT_DTYPES = {"int32": torch.int32, "int64": torch.int64}


def _cast(inputs: tuple[torch.Tensor, ...], dtype: str) -> tuple[torch.Tensor, ...]:
    if dtype == "fp32":
        return inputs
    # timestep stays float32 in every precision (it is a 1-element tensor; fp16 would round it)
    return tuple(x.half() if x.is_floating_point() and x.numel() > 1 else x for x in inputs)


def check_components(src: SourceModel, components: Iterable[str] | None) -> list[str]:
    names = list(dict.fromkeys(components)) if components is not None else list(src.family.default_components(src.config))
    unknown = [c for c in names if c not in src.specs]
    if unknown or not names:
        default = ",".join(src.family.default_components(src.config))
        raise SdtrtError(f"unknown component(s) for a {src.family.describe(src.config)} model: {', '.join(unknown) or '(none given)'}.",
                         f"pass --components with some of: {', '.join(src.specs)} (default: {default})")
    return names


def _load(spec: ComponentSpec, src: SourceModel) -> torch.nn.Module:
    try:
        return spec.load(src.path, src.pickle_weights)
    except (OSError, ValueError, RuntimeError) as e:  # a truncated or damaged weights file (diffusers, transformers, safetensors)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise SdtrtError(f"cannot load the {spec.name} weights from {src.path}: {first}",
                         "restore the model folder from the original checkpoint, or pass another model folder "
                         f"({MAKE_ONE})") from None


EMBEDDING_SLOTS = 32  # Textual Inversion rows reserved per text encoder: 32 x 1280 floats is 160 KB
MAX_EMBEDDING_SLOTS = 4096


def _adapters(src: SourceModel, loras: Sequence[tuple[str | Path, float]], allow_pickle: bool) -> list:
    """The LoRA files to merge, parsed against the model's weights (refused before any work if they do not fit)."""
    if not loras:
        return []
    import math

    from ..adapters import parse_adapter, weights_for

    table = weights_for(src.config)
    parsed = []
    for path, scale in loras:
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise SdtrtError(f"LoRA scale {scale!r} for {path} is not a finite number.", "pass e.g. (path, 0.8)",
                             cli_fix="write --lora FILE:0.8")
        parsed.append((parse_adapter(path, table, allow_pickle=allow_pickle), float(scale)))
    return parsed


def _merge(module: torch.nn.Module, spec: ComponentSpec, adapters: list) -> None:
    """W += scale·ΔW for every weight of this component an adapter changes (in fp32, before any cast)."""
    with torch.no_grad():
        for adapter, scale in adapters:
            for (subfolder, param), delta in adapter.deltas(scale).items():
                if subfolder == spec.weights:
                    module.get_parameter(spec.prefix + param).add_(delta)


def _reserve_rows(module: torch.nn.Module, spec: ComponentSpec, slots: int) -> None:
    """Grow the token embedding by `slots` zero rows: ids vocab .. vocab+slots-1 exist in the ONNX and are
    filled at run time by Textual Inversion (a zero row is never read until a token is assigned it)."""
    owner_name, _, attr = (spec.prefix + spec.token_embedding).rpartition(".")
    owner = module.get_submodule(owner_name)
    weight = getattr(owner, attr)
    grown = torch.cat([weight.detach(), weight.new_zeros(slots, weight.shape[1])])
    setattr(owner, attr, torch.nn.Parameter(grown, requires_grad=False))
    owner.num_embeddings = grown.shape[0]


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def with_controlnets(src: SourceModel, controlnets: Sequence[tuple[str | Path, str | None]], allow_pickle: bool) -> SourceModel:
    """The source model plus these ControlNet folders (each checked against the base UNet before any work):
    each becomes a component `controlnet_<name>` and the UNet takes their residuals."""
    if not controlnets:
        return src
    from .source import _weights

    nets: dict[str, Any] = {}
    files = list(src.weight_files)
    pickled = src.pickle_weights
    for folder, name in controlnets:
        folder = Path(folder)
        name = name or folder.name
        if not _NAME.match(name):
            raise SdtrtError(f"ControlNet name {name!r} is not a simple name (letters, digits, '-', '_').",
                             "pass (folder, 'canny')", cli_fix=f"pass --controlnet {folder}:canny")
        if name in nets:
            raise SdtrtError(f"two ControlNets are named {name!r}.", "give each its own name",
                             cli_fix=f"name them: --controlnet {folder}:{name}2")
        if not (folder / "config.json").is_file():
            raise SdtrtError(f"{folder} is not a diffusers ControlNet folder (no config.json).",
                             "pass a folder written by ControlNetModel.save_pretrained (or sdtrt make-model --preset tiny-controlnet)",
                             cli_fix="pass --controlnet a folder written by ControlNetModel.save_pretrained (or: sdtrt make-model --preset tiny-controlnet)")
        config = read_json(folder / "config.json")
        check_controlnet(folder, config, src)
        found, pickle = _weights(folder, allow_pickle)
        files += found
        pickled |= pickle
        nets[name] = {"source": str(folder.absolute()), "config": config}
    return dataclasses.replace(src, config={**src.config, "controlnets": nets}, weight_files=tuple(files), pickle_weights=pickled)


def check_controlnet(folder: Path, config: Mapping[str, Any], src: SourceModel) -> None:
    """Refuse a ControlNet trained for another base model: its residuals must fit this UNet's skip connections."""
    if config.get("_class_name") != "ControlNetModel":
        raise SdtrtError(f"{folder} holds a {config.get('_class_name') or 'model without _class_name'}, not a ControlNetModel.",
                         "pass a diffusers ControlNet folder", cli_fix="pass --controlnet a diffusers ControlNet folder")
    unet = src.config["unet"]
    fields = {"cross_attention_dim": "cross-attention width", "block_out_channels": "block widths",
              "layers_per_block": "layers per block", "addition_embed_type": "added conditioning"}
    for key, what in fields.items():
        if config.get(key) != unet.get(key):
            raise SdtrtError(f"the ControlNet in {folder} was built for another base model: its {what} is {config.get(key)}, "
                             f"this {src.family.describe(src.config)} UNet's is {unet.get(key)}.",
                             "use a ControlNet trained for this base model", cli_fix="pass --controlnet a ControlNet trained for this base model")


def check_size(height: int, width: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % VAE_FACTOR:
            raise SdtrtError(f"--{name} {v} is not a positive multiple of {VAE_FACTOR}.", f"use --{name} {nearest_sizes(max(v, 1))}")


def export_model(
    model_dir: Path,
    out: Path,
    components: Iterable[str] | None = None,
    dtype: str = "fp32",
    opset: int = graph.DEFAULT_OPSET,
    force: bool = False,
    validate_outputs: bool = True,
    height: int | None = None,
    width: int | None = None,
    fp16_vae: bool = False,
    allow_pickle: bool = False,
    external_data_threshold: int = graph.EXTERNAL_DATA_THRESHOLD,
    loras: Sequence[tuple[str | Path, float]] = (),
    embedding_slots: int = EMBEDDING_SLOTS,
    controlnets: Sequence[tuple[str | Path, str | None]] = (),
    show_progress: bool = True,
    log=print,
) -> Path:
    """Export, clean and validate each component into `out`; returns `out`. All or nothing.

    `loras` are merged into the weights (W + scale·ΔW) before tracing; `embedding_slots` rows are
    reserved after each text encoder's vocabulary for Textual Inversion at run time."""
    require("onnx", "export", "sdtrt export")
    require("onnxruntime", "export", "sdtrt export")
    if dtype not in DTYPES:
        raise SdtrtError(f"unknown dtype '{dtype}'.", "pass --dtype fp32 or --dtype fp16")
    graph.check_opset(opset)
    out = Path(out)
    check_not_inside(out, model_dir, "model folder")
    check_output_dir(out, force)
    src = with_controlnets(inspect_source(model_dir, allow_pickle), controlnets, allow_pickle)
    names = check_components(src, components)
    height = height if height is not None else src.default_size[0]
    width = width if width is not None else src.default_size[1]
    check_size(height, width)
    dtypes = component_dtypes([src.specs[n] for n in names], dtype, fp16_vae)
    if not isinstance(embedding_slots, int) or not 0 <= embedding_slots <= MAX_EMBEDDING_SLOTS:
        raise SdtrtError(f"embedding_slots={embedding_slots!r} is outside 0-{MAX_EMBEDDING_SLOTS}.", "pass 0 or more (default 32)",
                         cli_fix=f"pass --embedding-slots between 0 and {MAX_EMBEDDING_SLOTS}")
    adapters = _adapters(src, loras, allow_pickle)  # every file read and checked before any work
    if not validate_outputs:
        log("WARNING: --no-validate: the ONNX files are NOT checked against the torch model.")

    started = time.time()
    files: dict[str, OnnxFile] = {}
    checks: list[validate.Check] = []
    with atomic_dir(out, force) as tmp:
        bar = progress(total=len(names) * 3, desc="export", disable=not show_progress)
        for name in names:
            spec = src.specs[name]
            t0 = time.time()
            bar.set_postfix_str(f"{name}: trace ({dtypes[name]})")
            inputs = sample_inputs(spec, height, width)
            # One component's torch module at a time, freed before the graph work: a full-size UNet
            # is 3.4 GB in fp32 and the ONNX clean-up holds copies of the graph.
            module = _load(spec, src)
            _merge(module, spec, adapters)
            if spec.token_embedding:
                _reserve_rows(module, spec, embedding_slots)
            expected = validate.reference_outputs(module, inputs) if validate_outputs else None
            if dtypes[name] == "fp16":
                module = module.half()
            raw = tmp / ".raw" / name / "model.onnx"
            # Traced at a small size: the graph is the same at every size (dynamic axes), and tracing
            # runs the module once, which in fp16 on a CPU takes many minutes at 512 x 512.
            side = spec.trace_side
            matrices = {n.removeprefix(spec.prefix): list(p.shape) for n, p in module.named_parameters() if p.dim() >= 2}
            weights = graph.torch_to_onnx(module, _cast(sample_inputs(spec, side, side, seed=1), dtypes[name]), spec, raw, opset)
            del module
            gc.collect()
            bar.update()
            bar.set_postfix_str(f"{name}: clean graph")
            final = tmp / name / "model.onnx"
            external = graph.clean_and_save(raw, final, spec, external_data_threshold, weights)
            graph.remove(raw.parent)
            bar.update()
            if validate_outputs:
                bar.set_postfix_str(f"{name}: validate in ONNX Runtime")
                found = validate.compare_outputs(spec, dtypes[name], final, inputs, expected)
                checks += found
                validate.raise_on_failure(found)
            bar.update()
            present = graph.initializer_names(final)
            files[name] = OnnxFile(f"{name}/model.onnx", dtypes[name], file_sha256(final), final.stat().st_size, external,
                                   round(time.time() - t0, 2), matrices, sorted(n for n in matrices if spec.prefix + n not in present))
        bar.close()
        graph.remove(tmp / ".raw")
        tokenizers = {}
        for encoder in src.family.present_text_encoders(src.config):
            folder = src.family.tokenizer_folder(encoder)
            shutil.copytree(src.path / folder, tmp / folder)
            tokenizers[encoder] = Tokenizer(folder, sorted(p.name for p in (tmp / folder).iterdir()))
        shutil.copytree(src.path / "scheduler", tmp / "scheduler")
        ExportMeta(
            family=src.family.name, pipeline_class=src.pipeline_class, config=src.config, components=files,
            tokenizers=tokenizers, scheduler_config=src.scheduler_config,
            source=Source(str(src.path.absolute()), weights_sha256(src.weight_files, src.path)),
            dtype=dtype, opset=opset, default_size=[height, width], sdtrt_version=__version__,
            torch_version=torch.__version__, python=sys.version.split()[0], export_seconds=round(time.time() - started, 1),
            validation=[dict(vars(c), ok=c.ok) for c in checks],
            adapters=[AdapterRecord(str(Path(a.path).absolute()), a.sha256, scale) for a, scale in adapters],
            embedding_slots=embedding_slots,
        ).write(tmp)  # written last: its presence means complete
    if checks:
        log(validate.format_table(checks))
    return out
