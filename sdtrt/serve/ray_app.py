"""The same service as a Ray Serve deployment: each replica loads the model once and runs the same
FastAPI app (batching inside the replica); Ray routes requests across replicas.

As an importable app (README: "Serving"):

    from sdtrt.serve.ray_app import deployment
    serve.run(deployment("out/sd15-onnx", replicas=2, max_batch=4), route_prefix="/")

or `serve run sdtrt.serve.ray_app:build model_dir=out/sd15-onnx replicas=2`, or `sdtrt serve --ray`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from pathlib import Path
from typing import Any

from ray import serve

from .service import Limits, Settings


@serve.deployment(name="sdtrt", ray_actor_options={"num_cpus": 0}, health_check_period_s=10)
@serve.ingress()
class SdtrtReplica:
    def __init__(self, model_dir: str, backend: str = "auto", backend_options: dict | None = None,
                 settings: dict | None = None):
        from ..runtime.pipeline import Pipeline
        from .service import Service

        settings = dict(settings or {})
        limits = Limits(**settings.pop("limits", {}))
        lora_dir = settings.pop("lora_dir", None)
        config = Settings(**settings, limits=limits, lora_dir=Path(lora_dir) if lora_dir else None)
        self.service = Service(lambda: Pipeline.load(model_dir, backend=backend, **(backend_options or {})), config).start()
        self.service.loaded.wait()
        if self.service.load_error is not None:
            raise self.service.load_error

    def __serve_build_asgi_app__(self):
        from .app import create_app, replica_header

        app = create_app(self.service)
        replica_header(app)
        return app

    def check_health(self) -> None:
        if not self.service.ready:
            raise RuntimeError("sdtrt replica not ready")

    def __del__(self):
        service = getattr(self, "service", None)
        if service is not None:
            service.stop(deadline=service.settings.drain_seconds)


def _settings_dict(settings: Settings) -> dict[str, Any]:
    d = dataclasses.asdict(settings)
    d["lora_dir"] = str(settings.lora_dir) if settings.lora_dir else None
    return d


def deployment(model_dir: str | Path, *, replicas: int = 1, backend: str = "auto", backend_options: dict | None = None,
               settings: Settings | None = None, **settings_fields: Any):
    """A bound Ray Serve application: `replicas` copies of the model. Settings fields (max_batch, api_key, ...)
    may be given directly."""
    settings = settings or Settings(**settings_fields)
    max_ongoing = settings.max_queue + settings.max_batch  # the replica's own queue bounds its work
    return SdtrtReplica.options(num_replicas=replicas, max_ongoing_requests=max_ongoing,
                                graceful_shutdown_timeout_s=settings.drain_seconds).bind(
        str(model_dir), backend, backend_options or {}, _settings_dict(settings))


def build(args: dict[str, str]):
    """`serve run sdtrt.serve.ray_app:build model_dir=DIR replicas=2 max_batch=4 api_key=...`"""
    args = dict(args)
    model_dir = args.pop("model_dir")
    replicas = int(args.pop("replicas", 1))
    backend = args.pop("backend", "auto")
    types = {f.name: f.type for f in dataclasses.fields(Settings)}
    fields = {k: (float(v) if k == "max_wait_ms" or k == "drain_seconds" else int(v) if k in ("max_batch", "max_queue") else v)
              for k, v in args.items() if k in types}
    return deployment(model_dir, replicas=replicas, backend=backend, **fields)


def run(model_dir: str | Path, backend: str, backend_options: dict, settings: Settings, *, host: str, port: int,
        replicas: int) -> None:
    """`sdtrt serve --ray`: start (or join, with $RAY_ADDRESS) a Ray cluster, deploy, serve until SIGTERM / Ctrl-C."""
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, configure_logging=False)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(deployment(model_dir, replicas=replicas, backend=backend, backend_options=backend_options, settings=settings),
                  name="sdtrt", route_prefix="/")
        print(f"sdtrt serve --ray: {replicas} replica(s) on http://{host}:{port}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()  # replicas drain (graceful_shutdown_timeout_s) before they stop
        ray.shutdown()
