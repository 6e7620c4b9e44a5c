"""`sdtrt serve`: an HTTP service around one loaded model - A1111-compatible and native APIs, request
batching, backpressure and limits, Prometheus metrics, an API key, a drain on SIGTERM, and the same
service as a Ray Serve deployment.

    app.py      routes, error bodies, request metrics        a1111.py   A1111 fields <-> jobs
    native.py   POST /v1/images (sdtrt.Request over JSON)     service.py the model: admission, batches
    batcher.py  the batching scheduler (one worker thread)   jobs.py    jobs, rows, merged requests
    metrics.py  Prometheus                                   auth.py    the API key
    codec.py    base64 images in and out                     server.py  uvicorn with a drain
    ray_app.py  the Ray Serve deployment
"""

from __future__ import annotations

from .service import Limits, Service, Settings


def create_app(service):
    from .app import create_app as make

    return make(service)


__all__ = ["Limits", "Service", "Settings", "create_app"]
