"""The HTTP app: routes, error bodies, request metrics, the API key. Routes only translate (a1111.py,
native.py), queue the job (service.py) and wait for it, watching for a client that goes away and for
the request's deadline; they never run the model themselves."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import __version__
from ..errors import OutOfMemory, SdtrtError
from ..runtime.denoise import Cancelled
from ..runtime.request import InvalidRequest
from . import a1111, native
from .auth import ApiKey
from .errors import ApiError
from .service import Service

log = logging.getLogger("sdtrt.serve")
ROUTES = ("/health", "/ready", "/metrics", "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/samplers",
          "/sdapi/v1/sd-models", "/sdapi/v1/options", "/sdapi/v1/loras", "/v1/images")
POLL = 0.05  # seconds between checks for a client that went away


class ClientGone(Exception):
    pass


def create_app(service: Service) -> FastAPI:
    """The ASGI app for one loaded (or loading) model. The caller starts and stops the service."""
    app = FastAPI(title="sdtrt", version=__version__, description="Stable Diffusion on sdtrt: A1111-compatible and native APIs")
    app.state.service = service
    metrics = service.metrics
    limit = int(service.settings.limits.max_body_mb * 1024 * 1024)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return JSONResponse({"error": kind, "detail": str(e.detail)}, status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return JSONResponse({"error": "invalid_request", "detail": str(e.errors())[:500]}, status_code=422)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: ClientGone):
        return Response(status_code=499)  # nobody reads it: the client left (nginx's code for that)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal_error", "detail": "the server failed on this request; its log has the details."},
                            status_code=500)

    # --- probes and listings -----------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if service.ready:
            jobs, images = service.batcher.depth()
            return {"status": "ready", "model": service.settings.model_name, "queue": jobs, "queued_images": images}
        status = "draining" if service.draining else ("failed" if service.load_error else "loading")
        return JSONResponse({"status": status, "detail": str(service.load_error) if service.load_error else None},
                            status_code=503, headers={"Retry-After": "2"})

    @app.get("/metrics")
    async def prometheus():
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return a1111.samplers()

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        service.check_ready()
        return a1111.sd_models(service)

    @app.get("/sdapi/v1/options")
    async def options():
        service.check_ready()
        return {"sd_model_checkpoint": a1111.sd_models(service)[0]["title"], "CLIP_stop_at_last_layers": 1,
                "samples_format": "png"}

    @app.get("/sdapi/v1/loras")
    async def loras():
        """LoRA names usable in <lora:NAME:SCALE> tags (file names inside --lora-dir; never paths)."""
        folder = service.settings.lora_dir
        if folder is None:
            return []
        names = sorted(p.stem for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".pt", ".ckpt", ".bin")
                       and not p.name.startswith("."))
        return [{"name": n, "alias": n} for n in names]

    # --- generation ----------------------------------------------------------------------------------------

    async def generate(request: Request, translate: Callable[[Any], Any]) -> tuple[Any, list]:
        service.check_ready()
        body = await _read_json(request, limit)
        plan = await run_in_threadpool(translate, body)
        job = plan.job
        service.submit(job)
        metrics.in_flight.inc()
        try:
            results = await _wait(job, request, service)
        finally:
            metrics.in_flight.dec()
        return plan, results

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Request):
        plan, results = await generate(request, lambda body: a1111.txt2img(body, service))
        return JSONResponse(await _encode(service, lambda: a1111.finish(plan, results, service)))

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Request):
        plan, results = await generate(request, lambda body: a1111.img2img(body, service))
        return JSONResponse(await _encode(service, lambda: a1111.finish(plan, results, service)))

    @app.post("/v1/images")
    async def images(request: Request):
        png = "image/png" in request.headers.get("accept", "") and "json" not in request.headers.get("accept", "")

        def translate(body):
            plan = native.plan(body, service)
            if png and plan.job.size != 1:
                raise ApiError(406, "not_acceptable", f"Accept: image/png returns one image, but this request makes {plan.job.size}.",
                               fix="send Accept: application/json for several images")
            return plan

        plan, results = await generate(request, translate)
        files, info = await _encode(service, lambda: native.finish(plan, results))
        if png:
            return Response(files[0], media_type="image/png", headers={"X-Seed": str(info["seeds"][0])})
        return JSONResponse({"images": [base64.b64encode(f).decode("ascii") for f in files], **info})

    app.add_middleware(ApiKey, key=service.settings.api_key, on_refused=lambda: metrics.rejected.labels("unauthorized").inc())
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


async def _read_json(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    too_big = ApiError(413, "body_too_large", f"the request body is larger than this server's {limit // (1024 * 1024)} MiB.",
                       fix="send smaller images, or start the server with a higher --max-body-mb")
    if length is not None and length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    data = b"".join(chunks)
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "malformed_json", f"the request body is not valid JSON ({str(e)[:100]}).",
                       fix="send a JSON object with Content-Type: application/json") from None


async def _wait(job, request: Request, service: Service) -> list:
    """The job's results; cancels it (between denoising steps) if the client goes away or the deadline passes."""
    future = asyncio.wrap_future(job.future)
    future.add_done_callback(lambda f: f.cancelled() or f.exception())  # read even when nobody waits any more
    try:
        while True:
            timeout = min(POLL, max(0.0, job.deadline - time.monotonic()))
            await asyncio.wait({future}, timeout=timeout)
            if future.done():
                break
            if await request.is_disconnected():
                service.cancel(job, "disconnect")
                raise ClientGone()
            if time.monotonic() >= job.deadline:
                service.cancel(job, "timeout")
                raise ApiError(504, "timeout", f"the request took longer than this server's {service.settings.limits.timeout:g} s.",
                               fix="retry later, ask for fewer or smaller images, or start the server with a higher --timeout")
    except asyncio.CancelledError:  # the server stopped past its drain deadline
        service.cancel(job, "shutdown")
        raise
    try:
        return future.result()
    except Cancelled:
        if job.cancel_reason == "timeout":
            raise ApiError(504, "timeout", "the request timed out.") from None
        raise ApiError(503, "cancelled", f"the request was cancelled ({job.cancel_reason or 'shutdown'}).",
                       headers={"Retry-After": "5"}) from None
    except OutOfMemory as e:
        raise ApiError(503, "out_of_memory", e.problem, fix=e.fix, headers={"Retry-After": "10"}) from None
    except InvalidRequest as e:
        raise ApiError(422, "invalid_request", e.problem, field=e.param, fix=e.fix) from None
    except SdtrtError as e:
        raise ApiError(422, "invalid_request", e.problem, fix=e.fix) from None


async def _encode(service: Service, build: Callable[[], Any]) -> Any:
    t0 = time.monotonic()
    out = await run_in_threadpool(build)
    service.metrics.stage.labels("encode").observe(time.monotonic() - t0)
    return out


class RequestMetrics:
    """Counts every response by route and status, and times it (pure ASGI: no effect on streaming or disconnects)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        started, status = time.monotonic(), [499]

        async def record(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.monotonic() - started)


def replica_header(app: FastAPI) -> None:
    """Name the process in every response (X-Sdtrt-Replica): which Ray replica answered."""
    pid = str(os.getpid()).encode()

    class Tag:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            async def tagged(message):
                if message["type"] == "http.response.start":
                    message = {**message, "headers": [*message.get("headers", []), (b"x-sdtrt-replica", pid)]}
                await send(message)

            return await self.inner(scope, receive, tagged)

    app.add_middleware(Tag)
