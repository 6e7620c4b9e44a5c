"""Cold start: from a fresh process to the first image, what autoscaled replicas and a restarted server
pay every time. Each sample is its own Python process (nothing warm: imports, weights, sessions, the
first denoising loop), split into import / load / first image, systems interleaved per round:

  diffusers            from_pretrained + the first call
  sdtrt                Pipeline.load with ONNX Runtime's optimized graphs cached (every start after the first)
  sdtrt-no-cache       the same with the cache off (SDTRT_ORT_CACHE=0): graph optimization on every start
  sdtrt-first-start    once, before the rounds, into an empty cache (optimizes and writes the cache)

    python -m benchmarks.cold_start --model models/sd15 --onnx out/sd15-onnx --rounds 3
    sdtrt bench --preset sd15 --cold-start 3          # the same, inside a benchmark run

The page cache is not dropped (that needs root and disturbs the machine): every system reads its
weights from the OS's cache after its first round, as a restarted replica on the same host does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

_DIFFUSERS = """
import json, sys, time
t0 = time.perf_counter()
import torch, diffusers
t1 = time.perf_counter()
args = json.loads(sys.argv[3])
cls = getattr(diffusers, sys.argv[2])
pipe = cls.from_pretrained(sys.argv[1], torch_dtype=torch.float16 if args["device"] == "cuda" else torch.float32).to(args["device"])
pipe.set_progress_bar_config(disable=True)
t2 = time.perf_counter()
pipe(args["prompt"], negative_prompt=args["negative_prompt"], num_inference_steps=args["steps"], guidance_scale=args["guidance_scale"],
     height=args["height"], width=args["width"], generator=torch.Generator().manual_seed(args["seed"]))
if args["device"] == "cuda":
    torch.cuda.synchronize()
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first_image": t3 - t2}))
"""

_SDTRT = """
import json, sys, time
t0 = time.perf_counter()
import sdtrt
from sdtrt import Pipeline
t1 = time.perf_counter()
args = json.loads(sys.argv[3])
pipe = Pipeline.load(sys.argv[1], device=args["device"])
t2 = time.perf_counter()
pipe(args["prompt"], negative_prompt=args["negative_prompt"], steps=args["steps"], guidance_scale=args["guidance_scale"],
     height=args["height"], width=args["width"], seed=args["seed"], progress=False).images
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first_image": t3 - t2}))
"""


def one(script: str, path: Path, pipeline_class: str, request: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, float]:
    """One fresh process: its import, load and first-image seconds (and their sum)."""
    proc = subprocess.run([sys.executable, "-c", script, str(path), pipeline_class, json.dumps(request)],
                          capture_output=True, text=True, env={**_quiet_env(), **(env or {})})
    if proc.returncode:
        raise RuntimeError(f"cold-start process failed:\n{proc.stderr[-2000:]}")
    sample = json.loads(proc.stdout.strip().splitlines()[-1])
    sample["total"] = sample["import"] + sample["load"] + sample["first_image"]
    return {k: round(v, 3) for k, v in sample.items()}


def _quiet_env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def measure(model_dir: Path, onnx_dir: Path, pipeline_class: str, request: dict[str, Any], rounds: int, cache: Path,
            log=print) -> dict[str, Any]:
    """The first start into an empty cache `cache` (emptied here), then interleaved rounds; medians, ratios."""
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    cached = {"SDTRT_CACHE": str(cache)}
    first = one(_SDTRT, onnx_dir, pipeline_class, request, cached)
    log(f"cold start: sdtrt's first start (optimizing and caching its graphs) {first['total']:.2f} s")
    systems = {"diffusers": (_DIFFUSERS, model_dir, {}), "sdtrt": (_SDTRT, onnx_dir, cached),
               "sdtrt-no-cache": (_SDTRT, onnx_dir, {"SDTRT_ORT_CACHE": "0"})}
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in systems}
    for i in range(rounds):
        for name, (script, path, env) in systems.items():
            samples[name].append(one(script, path, pipeline_class, request, env))
        log(f"cold start round {i + 1}/{rounds}: " + ", ".join(f"{n} {s[-1]['total']:.2f} s" for n, s in samples.items()))
    median = {name: {k: round(statistics.median(s[k] for s in rows), 3) for k in STAGES} for name, rows in samples.items()}
    median["sdtrt-first-start"] = {k: first[k] for k in STAGES}
    ref = median["diffusers"]
    ratios = {name: {k: round(m[k] / ref[k], 3) if ref[k] else None for k in ("load", "total")} | {
                  "load_plus_first_image": round((m["load"] + m["first_image"]) / (ref["load"] + ref["first_image"]), 3)}
              for name, m in median.items() if name != "diffusers"}
    return {"rounds": rounds, "request": request, "samples": samples | {"sdtrt-first-start": [first]}, "median": median,
            "over_diffusers": ratios}


STAGES = ("import", "load", "first_image", "total")


def summary(doc: dict[str, Any]) -> str:
    rows = [f"{'cold start':<20}{'import':>9}{'load':>9}{'1st image':>11}{'total':>9}{'load+1st / diffusers':>23}"]
    for name, m in doc["median"].items():
        r = doc["over_diffusers"].get(name, {}).get("load_plus_first_image")
        rows.append(f"{name:<20}{m['import']:>8.2f}s{m['load']:>8.2f}s{m['first_image']:>10.2f}s{m['total']:>8.2f}s"
                    f"{'ref' if r is None else f'{r:.2f}x':>23}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cold_start", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="the diffusers folder")
    p.add_argument("--onnx", type=Path, required=True, help="its sdtrt ONNX (or engine) directory")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cache", type=Path, help="the ONNX Runtime cache folder the sdtrt processes use (emptied first; default: a temp folder)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cold_start.json"))
    a = p.parse_args(argv)
    import tempfile

    from sdtrt.artifacts import open_model_dir

    from .harness import library_versions, machine_info, write_json

    request = request_for(a.steps, a.size, a.size, a.device)
    cls = open_model_dir(a.onnx).family.pipeline_classes[0]
    with tempfile.TemporaryDirectory(prefix="sdtrt-cold-start-") as tmp:
        doc = {"machine": machine_info(), "versions": library_versions(),
               **measure(a.model, a.onnx, cls, request, a.rounds, a.cache or Path(tmp) / "cache")}
    write_json(doc, a.out)
    print(summary(doc))
    print(f"wrote {a.out}")
    return 0


def request_for(steps: int, height: int, width: int, device: str, guidance_scale: float = 7.5, seed: int = 0) -> dict[str, Any]:
    return {"prompt": "a watercolor painting of a fox", "negative_prompt": "blurry", "steps": steps, "guidance_scale": guidance_scale,
            "height": height, "width": width, "seed": seed, "device": device}


if __name__ == "__main__":
    sys.exit(main())
