"""Prometheus metrics, one registry per app (so several servers in one process, as in tests, do not
collide). Rates (images/s, requests/s) are `rate()` over the counters; `sdtrt_images_per_second`
is also exported directly, over the last minute, for dashboards without PromQL."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # no *_created series: they double the output and no dashboard reads them

LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
STAGES = ("queue_wait", "text_encoder", "prepare", "denoise", "vae_decoder", "run", "encode")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("sdtrt_requests", "HTTP requests answered, by route and status code", ["route", "status"], registry=r)
        self.latency = Histogram("sdtrt_request_seconds", "HTTP request latency, arrival to response", ["route"], buckets=LATENCY, registry=r)
        self.queue_jobs = Gauge("sdtrt_queue_depth", "requests waiting for the model", registry=r)
        self.queue_images = Gauge("sdtrt_queue_images", "images waiting for the model", registry=r)
        self.in_flight = Gauge("sdtrt_in_flight_requests", "generation requests being served (waiting or running)", registry=r)
        self.batch_images = Histogram("sdtrt_batch_images", "images per model call (batch size)", buckets=BATCH, registry=r)
        self.batch_requests = Histogram("sdtrt_batch_requests", "requests merged into one model call", buckets=BATCH, registry=r)
        self.stage = Histogram("sdtrt_stage_seconds", "seconds per stage: queue_wait (per request), the pipeline's stages "
                               "and run (per batch), encode (PNG, per request)", ["stage"], buckets=LATENCY, registry=r)
        self.images = Counter("sdtrt_images", "images generated", registry=r)
        self.cancelled = Counter("sdtrt_cancelled", "requests cancelled, by reason", ["reason"], registry=r)
        self.rejected = Counter("sdtrt_rejected", "requests refused before any work, by reason", ["reason"], registry=r)
        self.ready = Gauge("sdtrt_ready", "1 when the model is loaded and the server accepts work", registry=r)
        self.rate = Gauge("sdtrt_images_per_second", "images generated per second over the last 60 s", registry=r)
        self.rate.set_function(self._images_per_second)
        self._done: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def images_done(self, n: int) -> None:
        self.images.inc(n)
        with self._lock:
            self._done.append((time.monotonic(), n))

    def _images_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._done and self._done[0][0] < now - 60:
                self._done.popleft()
            return sum(n for _, n in self._done) / 60.0

    def batch(self, images: int, requests: int, timings: dict) -> None:
        self.batch_images.observe(images)
        self.batch_requests.observe(requests)
        for stage in ("text_encoder", "prepare", "denoise", "vae_decoder"):
            if isinstance(timings.get(stage), (int, float)):
                self.stage.labels(stage).observe(timings[stage])
        if isinstance(timings.get("total"), (int, float)):
            self.stage.labels("run").observe(timings["total"])

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
