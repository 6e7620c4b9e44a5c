"""Export and engine-build figures for a full-size preset: wall time and peak memory per step.

    python -m benchmarks.export_build --preset sd15 --work /path/with/20GB --out benchmarks/results/export_build.json

Each step runs as its own `sdtrt` process, sampled for peak RSS (the whole process tree), so the
figures are what a user's command costs. Not a test; the numbers go into the README.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from .harness import library_versions, machine_info, write_json


def run_measured(argv: list[str], log=print) -> dict:
    import psutil

    log("$ " + " ".join(argv))
    started = time.time()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = parent.memory_info().rss + sum(c.memory_info().rss for c in parent.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.2)
    output = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"step failed ({proc.returncode}):\n{output[-3000:]}")
    return {"command": " ".join(argv[1:]), "seconds": round(time.time() - started, 1), "peak_rss_gb": round(peak / 2**30, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.export_build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd15")
    p.add_argument("--work", type=Path, required=True, help="folder for the model, ONNX dirs and engines (~20 GB for sd15)")
    p.add_argument("--target", default="sm89", help="TensorRT-RTX build target")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/export_build.json"))
    p.add_argument("--skip", default="", help="comma-separated step names to skip (make-model,export-fp32,export-fp16,build-static,build-dynamic)")
    p.add_argument("--validate-size", type=int, help="export validation image side (default: the preset's native size)")
    p.add_argument("--static-size", type=int, help="static engine side (default: the preset's native size)")
    p.add_argument("--dynamic", default="256:512:768", metavar="MIN:OPT:MAX", help="dynamic engine side range in pixels")
    a = p.parse_args(argv)
    sdtrt = [sys.executable, "-m", "sdtrt"]
    w = a.work
    skip = set(filter(None, a.skip.split(",")))
    validate = ["--height", str(a.validate_size), "--width", str(a.validate_size)] if a.validate_size else []
    static = ["--height", str(a.static_size), "--width", str(a.static_size)] if a.static_size else []
    steps = {
        "make-model": [*sdtrt, "make-model", "--preset", a.preset, "--out", str(w / "model"), "--force"],
        "export-fp32": [*sdtrt, "export", str(w / "model"), "--out", str(w / "onnx-fp32"), "--force", "--no-progress", *validate],
        "export-fp16": [*sdtrt, "export", str(w / "model"), "--out", str(w / "onnx-fp16"), "--dtype", "fp16", "--force", "--no-progress",
                        *validate],
        "build-static": [*sdtrt, "build", str(w / "onnx-fp16"), "--out", str(w / "engines-static"), "--target", a.target, "--batch", "1",
                         *static, "--force", "--no-cache", "--no-progress"],
        "build-dynamic": [*sdtrt, "build", str(w / "onnx-fp16"), "--out", str(w / "engines-dynamic"), "--target", a.target,
                          "--batch", "1:1:4", "--height", a.dynamic, "--width", a.dynamic, "--force", "--no-cache", "--no-progress"],
    }
    results = {}
    for name, argv_ in steps.items():
        if name in skip:
            continue
        results[name] = run_measured(argv_)
        print(f"{name}: {results[name]['seconds']} s, peak RSS {results[name]['peak_rss_gb']} GB", flush=True)
        write_json({"preset": a.preset, "steps": results, "partial": True}, a.out)  # what finished survives a later failure
    doc = {"machine": machine_info(), "versions": library_versions(), "preset": a.preset, "steps": results}
    for kind in ("static", "dynamic"):
        manifest = w / f"engines-{kind}" / "engines.json"
        if manifest.is_file():
            doc[f"engines-{kind}"] = {n: {"build_seconds": e["build_seconds"], "size_mb": round(e["size_bytes"] / 1e6, 1)}
                                      for n, e in json.loads(manifest.read_text())["engines"].items()}
    write_json(doc, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
