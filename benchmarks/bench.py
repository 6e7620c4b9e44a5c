"""`sdtrt bench`: eager diffusers vs Optimum's ONNX Runtime pipeline vs sdtrt, side by side, in one process."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

from .harness import image_check, measure, parse_percent, regressions, results_document, write_json
from .systems import DiffusersSystem, OptimumSystem, Request, SdtrtSystem, System

ALL_SYSTEMS = ("diffusers", "diffusers-compile", "optimum", "sdtrt")


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
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (A B C A B C ...)")
    p.add_argument("--systems", default="diffusers,optimum,sdtrt", help=f"comma-separated subset of {', '.join(ALL_SYSTEMS)}")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads for Optimum and sdtrt (0: all cores)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    p.add_argument("--work-dir", type=Path, help="where models, ONNX and engines are cached (default: $SDTRT_CACHE/bench)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/bench.json"), help="results JSON")
    p.add_argument("--plot", type=Path, help="per-stage bar chart PNG (default: next to --out)")
    p.add_argument("--no-overhead", action="store_true", help="skip the no-op-UNet runs that measure per-step runtime overhead")
    p.add_argument("--min-psnr", type=float, default=40.0, help="every system's image must be this close to diffusers' (dB)")
    p.add_argument("--compare", type=Path, metavar="BASELINE.json", help="fail if a stage regressed against this earlier result")
    p.add_argument("--max-regression", default="5%", help="allowed slowdown per stage for --compare (e.g. 5%% or 0.05)")


def _work_dir(a: argparse.Namespace) -> Path:
    from sdtrt.default_model import cache_dir

    return a.work_dir or cache_dir() / "bench"


def _model_dir(a: argparse.Namespace, work: Path, log) -> tuple[Path, str]:
    from sdtrt.errors import SdtrtError
    from sdtrt.presets import make_model

    if a.model_dir and a.preset:
        raise SdtrtError("both a model folder and --preset were given.", "pass one of them")
    if a.model_dir:
        return a.model_dir, a.model_dir.name
    if not a.preset:
        raise SdtrtError("no model to benchmark.", "pass a diffusers folder or --preset sd15 (or tiny)")
    target = work / a.preset / "model"
    if not (target / "model_index.json").is_file():
        log(f"making the {a.preset} preset in {target} (once)")
        make_model(a.preset, target, force=True)
    return target, a.preset


def _sdtrt_onnx(model_dir: Path, work: Path, name: str, a: argparse.Namespace, dtype: str, log) -> Path:
    from sdtrt.export import export_model

    target = work / name / f"onnx-{dtype}"
    if not (target / "sdtrt.json").is_file():
        log(f"exporting {name} to {target} ({dtype}, once)")
        export_model(model_dir, target, dtype=dtype, height=a.height, width=a.width, force=True, log=log)
    return target


def build_systems(a: argparse.Namespace, model_dir: Path, name: str, work: Path, device, log) -> tuple[list[System], dict[str, Any]]:
    import psutil

    from sdtrt.errors import SdtrtError

    wanted = [s.strip() for s in a.systems.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(ALL_SYSTEMS))
    if unknown:
        raise SdtrtError(f"unknown system(s) {', '.join(unknown)}.", f"choose from {', '.join(ALL_SYSTEMS)}")
    if "diffusers" not in wanted:
        wanted.insert(0, "diffusers")  # the reference every ratio and image is measured against
    proc = psutil.Process()
    systems: list[System] = []
    load: dict[str, Any] = {}

    def add(make) -> None:
        before, t = proc.memory_info().rss, time.perf_counter()
        made = make()
        for s in made if isinstance(made, list) else [made]:
            systems.append(s)
            load[s.name] = {"load_seconds": round(time.perf_counter() - t, 2), "rss_load_delta_mb": round((proc.memory_info().rss - before) / 2**20, 1)}

    for system in wanted:
        if system == "diffusers":
            add(lambda: DiffusersSystem(model_dir, device))
        elif system == "diffusers-compile":
            add(lambda: DiffusersSystem(model_dir, device, compile_unet=True))
        elif system == "optimum":
            if importlib.util.find_spec("optimum") is None:
                log("optimum-onnx is not installed: skipping it (pip install 'sdtrt[bench]')")
                continue
            add(lambda: OptimumSystem(model_dir, device, work / name / "optimum-onnx", a.threads))
        elif system == "sdtrt":
            onnx32 = _sdtrt_onnx(model_dir, work, name, a, "fp32", log)
            if device.type == "cpu":
                add(lambda: SdtrtSystem(onnx32, "onnxruntime", device, threads=a.threads))
            else:
                import onnxruntime

                if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                    add(lambda: SdtrtSystem(_sdtrt_onnx(model_dir, work, name, a, "fp16", log), "onnxruntime", device,
                                            name="sdtrt-onnxruntime-cuda", device=device))
                else:
                    log("onnxruntime has no CUDA provider here: skipping sdtrt on ONNX Runtime CUDA (pip install 'sdtrt[onnxruntime-gpu]')")
                engines = _engines(model_dir, work, name, a, log)
                if engines is not None:
                    add(lambda: SdtrtSystem(engines, "tensorrt", device, device=device))
    return systems, load


def _engines(model_dir: Path, work: Path, name: str, a: argparse.Namespace, log) -> Path | None:
    from sdtrt.engines.build import build_engines
    from sdtrt.engines.toolkit import RTX_TARGETS, local_gpu_target

    library = "tensorrt" if importlib.util.find_spec("tensorrt") else (
        "tensorrt-rtx" if importlib.util.find_spec("tensorrt_rtx") and local_gpu_target() in RTX_TARGETS else None)
    if library is None:
        log("no TensorRT library can build for this GPU here: skipping sdtrt on TensorRT")
        return None
    target = work / name / f"engines-{library}-{a.height}x{a.width}-b{a.batch}"
    if not (target / "engines.json").is_file():
        build_engines(_sdtrt_onnx(model_dir, work, name, a, "fp16", log), target, backend=library, batch=str(a.batch),
                      height=str(a.height), width=str(a.width), force=True, log=log)
    return target


def run(a: argparse.Namespace, log=print) -> int:
    import torch

    from sdtrt.errors import SdtrtError

    device = torch.device("cuda" if (a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())) else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SdtrtError("--device cuda but no GPU is visible.", "use --device cpu")
    max_reg = parse_percent(a.max_regression)
    work = _work_dir(a)
    model_dir, name = _model_dir(a, work, log)
    prompts = a.prompt or ["a watercolor painting of a fox in a snowy forest, highly detailed"] * a.batch
    if len(prompts) != a.batch:
        raise SdtrtError(f"{len(prompts)} prompts for --batch {a.batch}.", "give one --prompt per image, or none")
    request = Request(prompts, [a.negative_prompt] * len(prompts), a.steps, a.guidance_scale, a.height, a.width, a.scheduler, a.seed)
    systems, load = build_systems(a, model_dir, name, work, device, log)
    measured = measure(systems, request, a.warmup, a.repeats, overhead=not a.no_overhead, log=log)
    report = image_check(measured["images"], a.min_psnr)
    config = {**{k: v for k, v in vars(request).items() if k not in ("prompts", "negative_prompts")}, "prompts": prompts,
              "negative_prompt": a.negative_prompt, "batch": a.batch, "warmup": a.warmup, "repeats": a.repeats,
              "threads": a.threads, "device": str(device), "model_dir": str(model_dir), "model_name": name,
              "systems": [s.name for s in systems]}
    doc = results_document(measured, config, report, load)
    write_json(doc, a.out)
    log(f"wrote {a.out}")
    from .plot import plot

    log(f"wrote {plot(doc, a.plot or a.out.with_suffix('.png'))}")
    log(table(doc))
    status = 0
    if not report["ok"]:
        log("IMAGES DIFFER: " + "; ".join(report["failures"]))
        status = 3
    if a.compare:
        found = regressions(doc, json.loads(a.compare.read_text()), max_reg)
        if found:
            log("REGRESSION: " + "; ".join(found))
            status = status or 4
        else:
            log(f"no stage regressed more than {a.max_regression} against {a.compare}")
    return status


def table(doc: dict[str, Any]) -> str:
    head = f"{'system':<26}{'end-to-end':>12}{'text enc':>10}{'UNet/call':>11}{'VAE dec':>10}{'x diffusers':>12}{'overhead/step':>15}{'PSNR':>8}"
    rows = [head, "-" * len(head)]
    psnrs = doc["same_image"]["psnr_db"]
    for name, e in doc["systems"].items():
        s = e["summary"]
        p = "ref" if name == "diffusers" else ("inf" if psnrs.get(name) is None else f"{psnrs[name]:.1f}")
        oh = f"{e['step_overhead_ms']:.3f} ms" if "step_overhead_ms" in e else "-"
        rows.append(f"{name:<26}{s['end_to_end']['median']:>11.3f}s{s['text_encoder']['median']:>9.3f}s{s['unet_per_call']['median']:>10.3f}s"
                    f"{s['vae_decoder']['median']:>9.3f}s{e.get('speedup_vs_diffusers', {}).get('end_to_end', 1.0):>11.2f}x{oh:>15}{p:>8}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sdtrt bench")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
