"""Load test of `sdtrt serve` with Locust (headless), on loopback only: throughput and latency percentiles
for 1, 4 and 16 concurrent clients (closed loop), with batching on and off. Each configuration starts its
own server (`sdtrt serve MODEL --max-batch B --max-wait-ms W`), warms it up, then runs Locust for a fixed
time per load level. Bounded in count and time; it stops by itself.

    python -m benchmarks.load_test                                   # tiny demo model, 64x64, 4 steps
    python -m benchmarks.load_test --model out/sd15-onnx --size 256 --users 4 --duration 120

Writes benchmarks/results/load-<name>.json and .md (a table for the README). Exit code 1 if any request
failed (the acceptance bar: no errors at the tested loads).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent
CONFIGS = {"batching on": ["--max-batch", "8", "--max-wait-ms", "20"], "batching off": ["--max-batch", "1", "--max-wait-ms", "0"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, flags: list[str], threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "sdtrt", "serve", *([model] if model else []), "--port", str(port), "--max-queue", "256",
           "--log-level", "warning", "--threads", str(threads), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        try:
            if requests.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready in 15 minutes")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


def warm_up(url: str, args) -> None:
    body = {"prompt": "warm-up", "steps": args.steps, "seed": 1}
    if args.size:
        body.update(width=args.size, height=args.size)
    for _ in range(3):
        r = requests.post(url + "/sdapi/v1/txt2img", json=body, timeout=900)
        r.raise_for_status()


def run_locust(url: str, users: int, args, out: Path) -> dict:
    prefix = out / f"u{users}"
    env = {**os.environ, "SDTRT_LOAD_STEPS": str(args.steps), "SDTRT_LOAD_SIZE": str(args.size or ""),
           "SDTRT_LOAD_SAMPLER": args.sampler}
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "locustfile.py"), "--headless", "-u", str(users), "-r", str(users),
           "-t", f"{args.duration}s", "--host", url, "--csv", str(prefix), "--only-summary", "--stop-timeout", "600",
           "--loglevel", "WARNING"]
    subprocess.run(cmd, env=env, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=args.duration + 900)
    with open(f"{prefix}_stats.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    count, failures = int(row["Request Count"]), int(row["Failure Count"])
    return {"users": users, "requests": count, "failures": failures, "images_per_s": round(float(row["Requests/s"]), 3),
            "p50_ms": float(row["50%"]), "p95_ms": float(row["95%"]), "p99_ms": float(row["99%"]),
            "mean_ms": round(float(row["Average Response Time"]), 1)}


def server_batches(url: str) -> dict:
    text = requests.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for name in ("sdtrt_batch_images_sum", "sdtrt_batch_images_count"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="ONNX / engine dir (default: the tiny demo model)")
    p.add_argument("--name", default=None, help="results file name (default: tiny or the model folder's name)")
    p.add_argument("--size", type=int, default=None, help="width = height in pixels (default: the model's native size)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sampler", default="Euler a")
    p.add_argument("--users", default="1,4,16", help="comma-separated concurrent clients")
    p.add_argument("--duration", type=int, default=20, help="seconds of load per level")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from: {', '.join(CONFIGS)}")
    p.add_argument("--threads", type=int, default=0, help="the server's ONNX Runtime threads (0: all cores)")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    name = args.name or (Path(args.model).name if args.model else "tiny")
    users = [int(u) for u in args.users.split(",")]
    results = {"model": name, "size": args.size, "steps": args.steps, "sampler": args.sampler, "duration_s": args.duration,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
               "note": "Locust and the server share this machine's cores; closed loop: N users = N requests in flight",
               "runs": []}
    failed = 0
    for config in args.configs.split(","):
        proc, url = start_server(args.model, CONFIGS[config], args.threads)
        try:
            warm_up(url, args)
            for n in users:
                before = server_batches(url)
                with tempfile.TemporaryDirectory() as tmp:
                    stats = run_locust(url, n, args, Path(tmp))
                after = server_batches(url)
                calls = after.get("sdtrt_batch_images_count", 0) - before.get("sdtrt_batch_images_count", 0)
                images = after.get("sdtrt_batch_images_sum", 0) - before.get("sdtrt_batch_images_sum", 0)
                stats["mean_batch"] = round(images / calls, 2) if calls else None
                stats["config"] = config
                failed += stats["failures"]
                results["runs"].append(stats)
                print(f"{config:13} users {n:3}: {stats['requests']:5} requests, {stats['failures']} failed, "
                      f"{stats['images_per_s']:7.2f} img/s, p50 {stats['p50_ms']:7.0f} ms, p95 {stats['p95_ms']:7.0f} ms, "
                      f"p99 {stats['p99_ms']:7.0f} ms, mean batch {stats['mean_batch']}", flush=True)
        finally:
            stop_server(proc)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"load-{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / f"load-{name}.md").write_text(table(results))
    print(f"wrote {args.out / f'load-{name}.json'} and .md")
    return 1 if failed else 0


def table(results: dict) -> str:
    size = f"{results['size']}x{results['size']}" if results["size"] else "native size"
    lines = [f"{results['model']}, {size}, {results['steps']} steps, {results['sampler']}, {results['duration_s']} s per level "
             f"({results['machine']})", "",
             "| batching | users | requests | errors | images/s | p50 ms | p95 ms | p99 ms | mean batch |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        lines.append(f"| {r['config'].split()[-1]} | {r['users']} | {r['requests']} | {r['failures']} | {r['images_per_s']:.2f} | "
                     f"{r['p50_ms']:.0f} | {r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
