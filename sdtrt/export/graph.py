"""torch.onnx export, graph cleanup (constant folding, shape inference, toposort) and saving."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import shutil
import warnings
from pathlib import Path

import torch

from ..models.spec import ComponentSpec
from ..errors import SdtrtError

MIN_OPSET, MAX_OPSET = 17, 20  # 17 brings LayerNormalization; 20 is the newest the TorchScript exporter writes
DEFAULT_OPSET = 17
# ONNX's protobuf cannot hold more than 2 GiB, so larger models keep weights in MODEL.onnx.data.
# The default leaves head-room under that hard limit; tests lower it to drive the path cheaply.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Constant folding must not turn a small Expand/Tile into a huge initializer.
FOLD_SIZE_LIMIT = 16 << 20


def check_opset(opset: int) -> None:
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise SdtrtError(f"opset {opset} cannot be produced: sdtrt exports opsets {MIN_OPSET}-{MAX_OPSET}.",
                         f"pass --opset {DEFAULT_OPSET} (the default; TensorRT and ONNX Runtime both take it) or another value in that range")


@contextlib.contextmanager
def _quiet():
    """torch's tracer warns about Python branches that are fine for these graphs; keep logs readable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def torch_to_onnx(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], spec: ComponentSpec, path: Path, opset: int) -> set[str]:
    """Trace `module` into `path` (a fresh folder per file: torch may write external tensors beside it).

    Returns the module's parameter names, which stay the ONNX initializers' names: torch's own constant
    folding is off because it would fold a Linear layer's weight transpose into an anonymous
    `onnx::MatMul_N` initializer. Keeping `Transpose(weight)` in the graph costs nothing at run time
    (ONNX Runtime and TensorRT fold it when they load the graph), and makes every weight addressable
    by its torch name: adapters replace initializers and refit engines by name, never by value."""
    axes = {t.name: t.dynamic_axes() for t in spec.inputs + spec.outputs if t.dynamic_axes()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quiet(), torch.no_grad():
        torch.onnx.export(
            module, inputs, str(path),
            dynamo=False,  # the TorchScript exporter handles SD's dynamic shapes reliably
            opset_version=opset,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=axes,
            do_constant_folding=False,
        )
    return {name for name, _ in module.named_parameters()}


def _quiet_onnxruntime() -> None:
    """Constant folding runs ONNX Runtime, whose optimizer logs harmless warnings per node."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)


def initializer_bytes(model) -> int:
    import onnx.numpy_helper  # noqa: F401  (ensures onnx is importable)

    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.HasField("raw_data") else 0
    return total


def name_io_dims(model, spec: ComponentSpec) -> None:
    """Give graph inputs/outputs the contract's dimension names (shape inference writes expressions
    such as floor(2.0*h) for outputs, which tools then show instead of H)."""
    values = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    for t in spec.inputs + spec.outputs:
        dims = values[t.name].type.tensor_type.shape.dim
        for axis, symbol in t.dynamic_axes().items():
            dims[axis].dim_param = symbol


def clean_and_save(raw_path: Path, out_path: Path, spec: ComponentSpec,
                   external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, weights: set[str] = frozenset()) -> bool:
    """Fold constants, infer shapes, toposort; save to `out_path`. Returns True if external data was used.

    Models torch wrote with external data (over 2 GiB: SD 1.5's fp32 UNet, SDXL's) are cleaned as a
    weightless graph and their tensors streamed, one at a time, from torch's files into
    model.onnx.data: memory stays at one tensor, not two copies of 10 GB (what made SDXL's fp32 export
    fit in 24 GB). Smaller models are cleaned in memory. Shape inference always runs on a weightless
    twin of the graph.
    """
    import onnx
    import onnx_graphsurgeon as gs

    logging.getLogger("onnx_graphsurgeon").setLevel(logging.ERROR)
    _quiet_onnxruntime()
    skeleton = onnx.load(str(raw_path), load_external_data=False)
    streamed = any(t.data_location == onnx.TensorProto.EXTERNAL for t in skeleton.graph.initializer)
    if streamed:  # small tensors (shapes, axes, scalars) inline: folding and shape inference need their values
        _load_external(skeleton, raw_path.parent, lambda t: (t.name not in weights or len(t.dims) < 2) and _external_length(t) <= INLINE_LIMIT)
    with _quiet(), contextlib.redirect_stdout(io.StringIO()):
        graph = gs.import_onnx(skeleton if streamed else onnx.load(str(raw_path)))
        del skeleton
        # nodes reading a named weight matrix or kernel (what adapters change) are not folded, so the
        # weight keeps its torch name (see torch_to_onnx); biases and norm scales fold as before
        def reads_named_weight(node) -> bool:
            return any(t.name in weights and len(getattr(t, "shape", None) or ()) >= 2 for t in node.inputs)

        graph.fold_constants(size_threshold=FOLD_SIZE_LIMIT, error_ok=True, should_exclude_node=reads_named_weight)
        graph.cleanup().toposort()
        model = gs.export_onnx(graph)
        del graph
        gc.collect()
        infer_shapes_in_place(model)
    name_io_dims(model, spec)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = out_path.name + ".data"
    if streamed:
        _stream_external_data(model, raw_path.parent, out_path.parent / data, weights)
        onnx.save_model(model, str(out_path))
        return True
    if initializer_bytes(model) > external_data_threshold:
        onnx.save_model(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        return True
    # The named weight matrices go to model.onnx.data even in small files: ONNX Runtime can replace an
    # initializer before it optimizes the graph only when it is stored outside the proto
    # (SessionOptions.add_external_initializers), which is how adapters change weights at run time.
    from onnx.external_data_helper import set_external_data

    named = [t for t in model.graph.initializer if t.name in weights and len(t.dims) >= 2]
    for t in named:
        set_external_data(t, location=data)
    onnx.save_model(model, str(out_path))
    return bool(named)


INLINE_LIMIT = 1 << 16  # external tensors up to 64 KiB are read back into the graph when it is cleaned


def _external_length(t) -> int:
    from onnx.external_data_helper import ExternalDataInfo

    info = ExternalDataInfo(t)
    if info.length:
        return int(info.length)
    n = 1
    for d in t.dims:
        n *= d
    return n * 8  # an upper bound when the length is not recorded


def _load_external(model, folder: Path, wanted) -> None:
    """Read the bytes of the external tensors `wanted` selects back into the graph (raw_data)."""
    from onnx.external_data_helper import ExternalDataInfo

    for t in model.graph.initializer:
        if t.data_location == t.EXTERNAL and wanted(t):
            info = ExternalDataInfo(t)
            with open(folder / info.location, "rb") as f:
                f.seek(info.offset or 0)
                t.raw_data = f.read(info.length) if info.length else f.read()
            del t.external_data[:]
            t.data_location = t.DEFAULT


def _stream_external_data(model, source_dir: Path, target: Path, weights: set[str]) -> None:
    """Move every external tensor's bytes from torch's files into one `target` file, tensor by tensor,
    and point the model at it; inline weight matrices move too (adapters need them outside the proto)."""
    from onnx.external_data_helper import ExternalDataInfo

    with open(target, "wb") as out:
        for t in model.graph.initializer:
            if t.data_location == t.EXTERNAL:
                info = ExternalDataInfo(t)
                with open(source_dir / info.location, "rb") as f:
                    f.seek(info.offset or 0)
                    payload = f.read(info.length) if info.length else f.read()
            elif t.name in weights and len(t.dims) >= 2 and t.HasField("raw_data"):
                payload = t.raw_data
            else:
                continue
            offset = out.tell()
            out.write(payload)
            del t.external_data[:]
            t.ClearField("raw_data")
            for key, value in (("location", target.name), ("offset", str(offset)), ("length", str(len(payload)))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            t.data_location = t.EXTERNAL
            del payload


def initializer_names(path: Path) -> set[str]:
    import onnx

    return {t.name for t in onnx.load(str(path), load_external_data=False).graph.initializer}


def infer_shapes_in_place(model) -> None:
    """ONNX shape inference on a copy without the large weights' bytes (their dims suffice), results copied back."""
    import onnx

    twin = onnx.ModelProto()
    twin.ir_version = model.ir_version
    twin.opset_import.extend(model.opset_import)
    g = twin.graph
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    for t in model.graph.initializer:
        if t.ByteSize() < 4096:  # small constants (shapes, axes) drive inference: keep their values
            g.initializer.append(t)
        else:
            g.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims)
    try:
        inferred = onnx.shape_inference.infer_shapes(twin, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is an optimisation aid; the graph stays valid without it
        return
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
