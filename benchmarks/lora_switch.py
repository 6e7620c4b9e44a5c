"""LoRA switch time on ONNX Runtime: how long `pipe.set_loras(...)` takes, for a full-size preset.

    python -m benchmarks.lora_switch --preset sd15 --work /path/with/15GB --out benchmarks/reference/lora_switch-sd15-cpu.json

One LoRA (kohya format, rank 16) on every attention projection of the UNet (to_q/k/v/out) and every
self-attention projection of the text encoder, generated with random factors. Measured, in one
process: the first switch (reads the touched base weights from the ONNX files once), later switches
A -> B -> A, back to no LoRA, and the UNet's time per call with and without the LoRA (switching must
not make the engine slower: replaced weights are optimized like the file's own). Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


def make_lora(path: Path, weights: dict, rank: int, seed: int) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for component, prefix, keys in (("unet", "lora_unet_", (".to_q.", ".to_k.", ".to_v.", ".to_out.0.")),
                                     ("text_encoder", "lora_te_", ("self_attn",))):
        for param, shape in weights[component].items():
            if any(k in param for k in keys) and len(shape) == 2:
                name = prefix + param.removesuffix(".weight").replace(".", "_")
                sd[f"{name}.lora_down.weight"] = torch.randn(rank, shape[1], generator=g) * 0.01
                sd[f"{name}.lora_up.weight"] = torch.randn(shape[0], rank, generator=g) * 0.01
                sd[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))
    return path


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_switch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd15")
    p.add_argument("--work", type=Path, required=True, help="folder for the model and its ONNX export (kept: re-runs reuse them)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--size", type=int, default=256, help="image side for the UNet timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/lora_switch.json"))
    a = p.parse_args(argv)

    from sdtrt import Pipeline
    from sdtrt.export import export_model
    from sdtrt.models.presets import make_model

    from .harness import library_versions, machine_info, write_json

    model, onnx_dir = a.work / "model", a.work / "onnx-fp32"
    if not (model / "model_index.json").is_file():
        make_model(a.preset, model, force=True)
    if not (onnx_dir / "sdtrt.json").is_file():
        export_model(model, onnx_dir, force=True, height=a.size, width=a.size)
    load_seconds = time.perf_counter()
    pipe = Pipeline.load(onnx_dir)
    load_seconds = time.perf_counter() - load_seconds
    table = pipe.adapters.weights()
    lora_a = make_lora(a.work / "a.safetensors", table, a.rank, 1)
    lora_b = make_lora(a.work / "b.safetensors", table, a.rank, 2)
    touched = sum(1 for c in ("unet", "text_encoder") for k, s in table[c].items()
                  if any(x in k for x in (".to_q.", ".to_k.", ".to_v.", ".to_out.0.", "self_attn")) and len(s) == 2)

    def unet_call() -> float:
        r = pipe("a fox", steps=3, seed=0, height=a.size, width=a.size, progress=False)
        return r.timings["unet"] / r.timings["unet_calls"]

    first = timed(lambda: pipe.set_loras([(lora_a, 0.8)]))
    switches = []
    for target in [lora_b, lora_a] * a.repeats:
        switches.append(timed(lambda t=target: pipe.set_loras([(t, 0.8)])))
    clear = timed(lambda: pipe.set_loras([]))
    # UNet time per call with and without the LoRA, interleaved (base, LoRA, base, ...) so that machine
    # noise hits both alike; the switches in between are not timed here
    base_unet, lora_unet = [], []
    for _ in range(a.repeats):
        pipe.set_loras([])
        base_unet.append(unet_call())
        pipe.set_loras([(lora_a, 0.8)])
        lora_unet.append(unet_call())
    doc = {"machine": machine_info(), "versions": library_versions(), "preset": a.preset, "rank": a.rank,
           "weights_touched": touched, "lora_file_mb": round(lora_a.stat().st_size / 1e6, 1),
           "pipeline_load_seconds": round(load_seconds, 2),
           "first_switch_seconds": round(first, 2),
           "switch_seconds": {"min": round(min(switches), 2), "median": round(statistics.median(switches), 2), "samples": [round(s, 2) for s in switches]},
           "clear_seconds": round(clear, 2),
           "unet_per_call_seconds": {"base_median": round(statistics.median(base_unet), 3), "lora_median": round(statistics.median(lora_unet), 3)},
           "size": a.size}
    write_json(doc, a.out)
    print(f"{touched} weights; first switch {first:.2f} s, then median {statistics.median(switches):.2f} s (min {min(switches):.2f}); "
          f"clear {clear:.2f} s; pipeline load {load_seconds:.2f} s; UNet/call {statistics.median(base_unet):.3f} s base, "
          f"{statistics.median(lora_unet):.3f} s with the LoRA")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
