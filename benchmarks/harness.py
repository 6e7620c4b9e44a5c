"""Interleaved measurement, statistics, the same-image check, results JSON and the regression gate."""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import platform
import statistics
import threading
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .systems import Request, Sample, System

SCHEMA = "sdtrt-bench/1"
STAGES = ("end_to_end", "text_encoder", "unet_per_call", "vae_decoder")
OPTIONAL_STAGES = ("controlnet_per_call",)  # reported when every sample has it (a ControlNet benchmark)
REFERENCE = "diffusers"


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    import torch

    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_capability"] = "sm%d%d" % torch.cuda.get_device_capability()
        info["cuda"] = torch.version.cuda
        try:
            import subprocess

            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def library_versions() -> dict[str, str]:
    out = {}
    for dist in ("sdtrt", "torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "optimum", "optimum-onnx",
                 "tensorrt", "tensorrt-rtx", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


class RssSampler:
    """Samples this process's resident memory every few milliseconds (psutil), for peak RSS per window."""

    def __init__(self, period: float = 0.01):
        import psutil

        self._proc = psutil.Process()
        self._period = period
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(self._period)

    @contextmanager
    def window(self) -> Iterator[dict]:
        self._peak = self._proc.memory_info().rss
        box: dict = {}
        yield box
        box["peak_mb"] = max(self._peak, self._proc.memory_info().rss) / 2**20

    def close(self) -> None:
        self._stop.set()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("-inf")
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(255.0**2 / mse))


def image_check(images: dict[str, np.ndarray], min_psnr: float, reference: str = REFERENCE) -> dict[str, Any]:
    """Every system's first image against the reference's: speed must not come from a different picture.
    Each image's sha256 (of its uint8 pixels) lets two runs, or two modes, be compared exactly."""
    ref = images[reference]
    scores = {name: psnr(img, ref) for name, img in images.items() if name != reference}
    failures = [f"{name}: {score:.1f} dB < {min_psnr} dB" for name, score in scores.items() if score < min_psnr]
    return {"reference": reference, "min_psnr_db": min_psnr, "psnr_db": {k: (None if v == float("inf") else round(v, 2)) for k, v in scores.items()},
            "ok": not failures, "failures": failures,
            "image_sha256": {name: hashlib.sha256(np.ascontiguousarray(img).tobytes()).hexdigest() for name, img in images.items()}}


def stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(systems: list[System], request: Request, warmup: int, repeats: int, overhead: bool, log=print) -> dict[str, Any]:
    """Warm up each system, then run them interleaved (A B C A B C ...) `repeats` times. One-at-a-time
    mode calls this once per system, with that system alone."""
    sampler = RssSampler()
    results: dict[str, dict[str, Any]] = {s.name: {"samples": []} for s in systems}
    images: dict[str, np.ndarray] = {}
    try:
        for s in systems:
            for _ in range(warmup):
                s.run(request)
            log(f"warmed up {s.name}")
        for round_ in range(repeats):
            for s in systems:
                gpu = _gpu_reset(s)
                with sampler.window() as mem:
                    sample: Sample = s.run(request)
                row = {k: getattr(sample, k) for k in STAGES}
                row.update({k: getattr(sample, k) for k in OPTIONAL_STAGES if getattr(sample, k) is not None})
                row["unet_calls"] = sample.unet_calls
                results[s.name]["samples"].append(row)
                entry = results[s.name]
                entry["rss_peak_mb"] = round(max(entry.get("rss_peak_mb", 0.0), mem["peak_mb"]), 1)
                if gpu:
                    entry["gpu_peak_mb"] = round(max(entry.get("gpu_peak_mb", 0.0), _gpu_peak()), 1)
                images.setdefault(s.name, sample.image)
                log(f"round {round_ + 1}/{repeats} {s.name}: {sample.end_to_end:.3f} s")
        if overhead:
            for s in systems:
                per_step = [s.step_overhead(request) for _ in range(3)]
                if per_step[0] is not None:
                    results[s.name]["step_overhead_ms"] = round(1000 * min(per_step), 4)
    finally:
        sampler.close()
    for name, entry in results.items():
        stages = list(STAGES) + [k for k in OPTIONAL_STAGES if entry["samples"] and all(k in row for row in entry["samples"])]
        entry["summary"] = {k: stats([row[k] for row in entry["samples"]]) for k in stages}
    return {"systems": results, "images": images}


def add_speedups(measured: dict[str, Any]) -> dict[str, Any]:
    """Each system's speed-up over eager diffusers per stage (> 1 means faster), once all are measured."""
    results = measured["systems"]
    if REFERENCE in results:
        ref = results[REFERENCE]["summary"]
        for entry in results.values():
            entry["speedup_vs_diffusers"] = {k: round(ref[k]["median"] / entry["summary"][k]["median"], 3)
                                             for k in (*STAGES, *OPTIONAL_STAGES)
                                             if k in entry["summary"] and k in ref and entry["summary"][k]["median"] > 0}
    return measured


def _gpu_reset(system: System) -> bool:
    import torch

    if system.device.type != "cuda":
        return False
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return True


def _gpu_peak() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def results_document(measured: dict[str, Any], config: dict[str, Any], image_report: dict[str, Any], load: dict[str, Any]) -> dict[str, Any]:
    for name, extra in load.items():
        measured["systems"][name].update(extra)
    return {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": library_versions(),
        "config": config,
        "systems": measured["systems"],
        "same_image": image_report,
    }


def write_json(doc: dict[str, Any], path: Path) -> None:
    """All or nothing (a temporary beside `path`, then a rename), with the mode a plain open() gives."""
    from sdtrt.files import write_text

    write_text(path, json.dumps(doc, indent=2) + "\n")


def write_chart(doc: dict[str, Any], path: Path) -> Path:
    """The per-stage chart, written like write_json: all or nothing."""
    from sdtrt.files import atomic_file

    from .plot import plot

    path = Path(path)
    with atomic_file(path) as tmp:
        drawn = tmp.with_name(tmp.name + path.suffix)  # matplotlib picks the image format from the suffix
        try:
            plot(doc, drawn)
            os.replace(drawn, tmp)
        finally:
            drawn.unlink(missing_ok=True)
    return path


def check_output_path(path: Path, flag: str) -> None:
    """Refuse an output file that could not be written, before any work is done."""
    from sdtrt.errors import SdtrtError
    from sdtrt.files import check_can_write

    if Path(path).is_dir():
        example = Path(path) / ("bench.png" if flag == "--plot" else "bench.json")
        raise SdtrtError(f"{flag} {path} is a folder.", f"pass a file path to {flag}, e.g. {flag} {example}")
    check_can_write(path, flag)


def load_results(path: Path, flag: str) -> dict[str, Any]:
    """Read an earlier results JSON (for --compare), refusing anything that is not one, before any work is done."""
    from sdtrt.errors import SdtrtError

    path = Path(path)
    fix = f"pass an existing results JSON to {flag} (write one with `sdtrt bench ... --out FILE`)"
    if not path.is_file():
        raise SdtrtError(f"{flag} {path} " + ("is a directory." if path.is_dir() else "does not exist."), fix)
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise SdtrtError(f"{flag} {path} cannot be read ({e.strerror}).", fix) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SdtrtError(f"{flag} {path} is not valid JSON ({e}).", fix) from None
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema != SCHEMA:
        raise SdtrtError(f"{flag} {path} is not a benchmark result (schema {schema!r}, expected {SCHEMA!r}).", fix)
    systems = doc.get("systems")
    broken = [name for name, entry in systems.items() if not _has_medians(entry)] if isinstance(systems, dict) else ["systems"]
    if broken:
        raise SdtrtError(f"{flag} {path} lacks per-stage medians for {', '.join(broken)}.", fix)
    return doc


def _has_medians(entry: Any) -> bool:
    summary = entry.get("summary") if isinstance(entry, dict) else None
    return isinstance(summary, dict) and all(
        isinstance(summary.get(k), dict) and isinstance(summary[k].get("median"), (int, float)) for k in STAGES)


def regressions(current: dict[str, Any], baseline: dict[str, Any], max_regression: float) -> list[str]:
    """Stages whose median got slower than the baseline's by more than `max_regression` (0.05 = 5%)."""
    found = []
    for name, entry in current["systems"].items():
        base = baseline.get("systems", {}).get(name)
        if base is None:
            continue
        for stage in STAGES:
            now, before = entry["summary"][stage]["median"], base["summary"][stage]["median"]
            if before > 0 and now > before * (1 + max_regression):
                found.append(f"{name} {stage}: median {now:.4f} s vs baseline {before:.4f} s "
                             f"(+{100 * (now / before - 1):.1f}% > {100 * max_regression:g}%)")
    return found


def parse_percent(text: str) -> float:
    """'5%' or '0.05' -> 0.05; ValueError for anything else, negative or not finite."""
    text = str(text).strip()
    value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value
