"""Export validation: run each ONNX file in ONNX Runtime against its torch module on real-shaped inputs.
Tolerances are the component spec's (see sdtrt/models/spec.py for why they are what they are)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from ..models.spec import ComponentSpec
from ..errors import SdtrtError

@dataclasses.dataclass(frozen=True)
class Check:
    component: str
    dtype: str
    output: str
    max_abs: float
    rel: float
    tol: float
    finite: bool

    @property
    def ok(self) -> bool:
        return self.finite and self.rel <= self.tol


class ValidationFailed(SdtrtError):
    pass


def ort_session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def reference_outputs(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The fp32 torch module's outputs: computed before export, so the module can be freed early."""
    with torch.no_grad():
        out = module(*inputs)
    return out if isinstance(out, tuple) else (out,)


def compare(spec: ComponentSpec, dtype: str, onnx_path: Path, reference: torch.nn.Module,
            inputs: tuple[torch.Tensor, ...]) -> list[Check]:
    """One Check per output: the ONNX (fed inputs cast to its dtype) vs the fp32 torch module."""
    return compare_outputs(spec, dtype, onnx_path, inputs, reference_outputs(reference, inputs))


def compare_outputs(spec: ComponentSpec, dtype: str, onnx_path: Path, inputs: tuple[torch.Tensor, ...],
                    ref: tuple[torch.Tensor, ...]) -> list[Check]:
    session = ort_session(onnx_path)
    feeds = {}
    for t, x in zip(spec.inputs, inputs):
        feeds[t.name] = x.numpy().astype(t.concrete_dtype(dtype))
    got = session.run(spec.output_names, feeds)
    checks = []
    for t, r, g in zip(spec.outputs, ref, got):
        g64, r64 = g.astype(np.float64), r.double().numpy()
        finite = bool(np.isfinite(g64).all())
        err = float(np.abs(g64 - r64).max()) if finite else float("inf")
        scale = max(float(np.abs(r64).max()), 1e-12)
        checks.append(Check(spec.name, dtype, t.name, err, err / scale, spec.tolerances[dtype], finite))
    return checks


def format_table(checks: list[Check]) -> str:
    width = max([13] + [len(c.component) + 1 for c in checks])
    head = f"{'component':<{width}}{'dtype':<6}{'output':<20}{'max_abs':>10}{'rel':>10}{'tol':>9}  result"
    rows = [head, "-" * len(head)]
    for c in checks:
        verdict = "ok" if c.ok else ("NaN/inf" if not c.finite else "MISMATCH")
        rows.append(f"{c.component:<{width}}{c.dtype:<6}{c.output:<20}{c.max_abs:>10.2e}{c.rel:>10.2e}{c.tol:>9.0e}  {verdict}")
    return "\n".join(rows)


def raise_on_failure(checks: list[Check]) -> None:
    bad = [c for c in checks if not c.ok]
    if not bad:
        return
    table = format_table(checks)
    overflow = [c for c in bad if not c.finite]
    if overflow:
        c = overflow[0]
        raise ValidationFailed(
            f"{c.component} overflowed in {c.dtype}: output '{c.output}' has inf/NaN.\n{table}",
            "export with --dtype fp32" + (" or drop --fp16-vae (the VAE is fp32 by default)" if c.component.startswith("vae") else ""),
        )
    c = bad[0]
    raise ValidationFailed(
        f"{c.component} ({c.dtype}) does not match its torch module: output '{c.output}' relative error "
        f"{c.rel:.2e} > tolerance {c.tol:.0e}. No ONNX directory was written.\n{table}",
        "report this with the table above; --no-validate skips the check but the ONNX is then unverified",
    )
