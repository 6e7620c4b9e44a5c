"""Peak memory and time of one large VAE decode, whole and in tiles (`vae_tiling`), on ONNX Runtime.

    python -m benchmarks.vae_tiling --preset sd15 --work /path/with/2GB --size 2048 --out benchmarks/results/vae_tiling-sd15-2048-cpu.json

Makes the preset's model (random weights) and exports only its VAE decoder (fp32, validated at 512x512) into
--work, once; later runs reuse them. Then each variant runs in a fresh subprocess of its own, so its peak RSS
(the kernel's ru_maxrss for that process, from wait4) is that variant's alone: imports + ONNX Runtime session
+ the decode(s). The child also reports its RSS just before the first decode, so the decode's own share is the
difference. Latents are seeded N(0, 1) / scaling_factor, as the pipeline hands them to the decoder.

A variant that cannot allocate is reported as out of memory instead of crashing the machine: each child caps
its address space (RLIMIT_AS) at --memory-limit GB (default: 90% of the memory available when the benchmark
starts), so ONNX Runtime's allocation fails cleanly (the OutOfMemory the runtime turns into "pass
--vae-tiling") rather than waking the kernel's OOM killer, which may pick another process. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("whole", "tiled")


def child(a: argparse.Namespace) -> int:
    """One variant in this process; prints one JSON line (the last line of stdout)."""
    if a.memory_limit:
        limit = int(a.memory_limit * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    report: dict = {"variant": a.child}
    try:
        import torch

        from sdtrt.artifacts import open_model_dir
        from sdtrt.errors import OutOfMemory
        from sdtrt.runtime import backends, vae

        t0 = time.perf_counter()
        model = open_model_dir(a.onnx)
        backend = backends.load("onnxruntime", model, threads=a.threads)
        report["load_seconds"] = round(time.perf_counter() - t0, 3)
        config = model.meta.config["vae"]
        tiles = vae.Tiles.from_config(config) if a.child == "tiled" else None
        side = a.size // 8
        z = torch.randn(1, int(config.get("latent_channels", 4)), side, side, generator=torch.Generator().manual_seed(0))
        z = z / float(config.get("scaling_factor", 0.18215))
        calls = []

        def decoder(t):
            calls.append(tuple(t.shape))
            return backend.run("vae_decoder", {"latent": t})

        report["rss_before_decode_mb"] = round(_rss_mb(), 1)
        times = []
        for _ in range(a.repeats):
            calls.clear()
            t0 = time.perf_counter()
            images = vae.decode(decoder, z, tiles)
            times.append(time.perf_counter() - t0)
        report.update(status="ok", decode_seconds=[round(t, 3) for t in times], decoder_calls=len(calls),
                      tile_latents=(tiles.latent if tiles else None), image_shape=list(images.shape),
                      finite=bool(torch.isfinite(images).all()))
    except OutOfMemory as e:
        report.update(status="out_of_memory", error=str(e).splitlines()[0], requested_bytes=e.requested)
    except MemoryError as e:
        report.update(status="out_of_memory", error=f"MemoryError: {e}")
    report["peak_rss_self_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(report), flush=True)
    return 0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(variant: str, a: argparse.Namespace, onnx_dir: Path, memory_limit: float | None) -> dict:
    """Run one variant in a fresh interpreter; its peak RSS from wait4 (this child alone)."""
    cmd = [sys.executable, "-m", "benchmarks.vae_tiling", "--child", variant, "--onnx", str(onnx_dir), "--size", str(a.size),
           "--repeats", str(a.repeats), "--threads", str(a.threads)]
    if memory_limit:
        cmd += ["--memory-limit", str(memory_limit)]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
        out = proc.stdout.read()  # to the end: the child has exited (or closed stdout)
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, not by Popen, to get this child's own rusage
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        stderr.seek(0)
        err = stderr.read()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else {"variant": variant}
    if proc.returncode != 0 or not lines:
        code = proc.returncode
        why = f"killed by signal {-code} (the kernel's OOM killer?)" if code < 0 else f"exit code {code}"
        report.update(status="failed", error=f"{why}: {err.strip().splitlines()[-1] if err.strip() else 'no output'}")
    report["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # Linux: kilobytes
    report["process_seconds"] = round(wall, 2)
    if report.get("rss_before_decode_mb") is not None:
        report["decode_peak_over_loaded_mb"] = round(report["peak_rss_mb"] - report["rss_before_decode_mb"], 1)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.vae_tiling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd15", help="model preset (sd15; tiny for a quick check)")
    p.add_argument("--work", type=Path, help="folder for the model and its VAE-decoder export (kept: re-runs reuse them)")
    p.add_argument("--size", type=int, default=2048, help="image side in pixels (a multiple of 8)")
    p.add_argument("--repeats", type=int, default=1, help="decodes per variant (each variant loads once)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: whole, tiled")
    p.add_argument("--memory-limit", type=float, help="address-space cap per variant, GB (default: 90%% of the memory available now)")
    p.add_argument("--out", type=Path, help="results JSON (default: benchmarks/results/vae_tiling-PRESET-SIZE.json)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--onnx", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        return child(a)
    if a.work is None:
        p.error("--work is required")
    if a.size <= 0 or a.size % 8:
        p.error("--size must be a positive multiple of 8")
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if not variants or set(variants) - set(VARIANTS):
        p.error(f"--variants takes {', '.join(VARIANTS)}")
    out = a.out or Path(f"benchmarks/results/vae_tiling-{a.preset}-{a.size}.json")

    from sdtrt.errors import available_memory
    from sdtrt.export import export_model
    from sdtrt.models.presets import make_model

    from .harness import check_output_path, library_versions, machine_info, write_json

    check_output_path(out, "--out")
    model, onnx_dir = a.work / f"{a.preset}-model", a.work / f"{a.preset}-vae-decoder-onnx"
    if not (model / "model_index.json").is_file():
        make_model(a.preset, model, force=True)
    if not (onnx_dir / "sdtrt.json").is_file():
        export_model(model, onnx_dir, components=["vae_decoder"], height=512, width=512, force=True, show_progress=False)
    available = available_memory()
    limit = a.memory_limit or (round(0.9 * available / 2**30, 1) if available else None)

    results = {}
    for variant in variants:
        r = run_variant(variant, a, onnx_dir, limit)
        results[variant] = r
        times = r.get("decode_seconds") or []
        timing = f"decode median {statistics.median(times):.2f} s over {len(times)}" if times else r.get("error", r.get("status"))
        print(f"{variant:6s} peak RSS {r['peak_rss_mb']:.0f} MB (loaded {r.get('rss_before_decode_mb', 0):.0f} MB); "
              f"{r.get('decoder_calls', '-')} decoder call(s); {timing}", flush=True)
    doc = {"benchmark": "vae_tiling", "machine": machine_info(), "versions": library_versions(), "preset": a.preset,
           "size": [a.size, a.size], "latents": [a.size // 8, a.size // 8], "backend": "onnxruntime (CPU, fp32)",
           "threads": a.threads, "repeats": a.repeats, "memory_available_gb_at_start": round(available / 2**30, 1) if available else None,
           "memory_limit_gb_per_variant": limit,
           "method": "each variant in its own subprocess; peak_rss_mb = that process's ru_maxrss (wait4): imports, session and decode",
           "variants": results}
    write_json(doc, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
