"""The model behind the HTTP routes: loads the pipeline once, checks each job against the model and
the server's limits before it queues (so a bad request costs nothing and never reaches a batch),
and runs batches: LoRA set, one merged `Pipeline.run` with one generator per image, results back
to each job. Front ends (A1111, /v1/images) build `Job`s; they never call the pipeline."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import SdtrtError
from ..runtime import schedulers
from ..runtime.denoise import Cancelled
from ..runtime.request import InvalidRequest, Request
from .batcher import Batcher, QueueFull, Stopped
from .errors import ApiError, invalid, over_limit
from .jobs import Batch, Job, Row, RowResult, merged_request
from .metrics import Metrics

log = logging.getLogger("sdtrt.serve")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Caps per request (422 naming the limit past them) and on the server's work."""

    max_steps: int = 150
    max_size: int = 2048  # pixels per side
    max_images: int = 16  # images per request (A1111: batch_size x n_iter)
    max_prompt_tokens: int = 300  # CLIP tokens per prompt / negative prompt (A1111 syntax: over all chunks)
    max_body_mb: float = 50.0  # request body
    max_input_pixels: int = 50_000_000  # an uploaded image, before it is resized
    timeout: float = 600.0  # seconds from arrival to response, queueing included


@dataclasses.dataclass(frozen=True)
class Settings:
    max_batch: int = 8  # images per model call
    max_wait_ms: float = 20.0  # how long the oldest request waits for company
    max_queue: int = 64  # requests waiting; past this, 503 + Retry-After
    api_key: str | None = None
    lora_dir: Path | None = None
    limits: Limits = Limits()
    drain_seconds: float = 60.0  # SIGTERM: how long in-flight requests may take to finish
    model_name: str = "sdtrt"


class Service:
    def __init__(self, load: Callable[[], Any], settings: Settings, metrics: Metrics | None = None):
        self.load, self.settings = load, settings
        self.metrics = metrics or Metrics()
        self.pipe = None
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()
        self.draining = False
        self.on_fatal: Callable[[BaseException], None] = lambda e: None
        self.batcher = Batcher(self._run_batch, max_batch=settings.max_batch, max_wait=settings.max_wait_ms / 1000,
                               max_queue=settings.max_queue, on_change=self._queue_changed)
        self._loras: tuple = ()
        self._last_batch_seconds = 1.0
        self._started = False

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> "Service":
        """Load the model on the worker thread (the server answers /health meanwhile, /ready once loaded)."""
        if not self._started:
            self._started = True
            self.batcher.start(before_first=self._load)
        return self

    def _load(self) -> None:
        try:
            self.pipe = self.load()
        except BaseException as e:  # noqa: BLE001 - reported through /ready and on_fatal, the server exits
            self.load_error = e
            log.error("loading the model failed: %s", e)
            self.on_fatal(e)
        finally:
            self.loaded.set()
        self.metrics.ready.set(1 if self.ready else 0)

    @property
    def ready(self) -> bool:
        return self.pipe is not None and not self.draining

    def drain(self) -> None:
        """Stop accepting work; what is queued or running finishes."""
        self.draining = True
        self.metrics.ready.set(0)

    def stop(self, deadline: float) -> None:
        self.drain()
        self.batcher.stop(timeout=deadline)
        if self.batcher.thread is not None and self.batcher.thread.is_alive():
            self.batcher.abort("shutdown")
            self.batcher.stop(timeout=30)

    # --- admission -----------------------------------------------------------------------------------

    def check_ready(self) -> None:
        if self.draining:
            raise ApiError(503, "shutting_down", "the server is shutting down and takes no new work.",
                           fix="retry on another replica", headers={"Retry-After": "5"})
        if self.pipe is None:
            detail = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading."
            raise ApiError(503, "not_ready", detail, fix="retry when GET /ready answers 200", headers={"Retry-After": "2"})

    def prepare(self, template: Request, rows: list[Row], names: dict[str, str], loras: tuple = (),
                solo: Request | None = None) -> Job:
        """Validate a job against the limits and the model, resolve its defaults, and give it its batch key."""
        self.check_ready()
        pipe, limits = self.pipe, self.settings.limits
        name = lambda p: names.get(p, p)  # noqa: E731 - the front end's spelling of a Request field
        count = len(rows) if solo is None else solo.batch
        if count > limits.max_images:
            raise over_limit(name("images"), count, limits.max_images, "--max-images")
        if template.steps is not None and isinstance(template.steps, int) and template.steps > limits.max_steps:
            raise over_limit(name("steps"), template.steps, limits.max_steps, "--max-steps")
        for side in ("height", "width"):
            v = getattr(template, side)
            if isinstance(v, int) and v > limits.max_size:
                raise over_limit(name(side), v, limits.max_size, "--max-size")
        first = rows[0] if rows else None
        sample = solo if solo is not None else self._row_request(template, first)
        try:
            checked = pipe.check(sample)
        except InvalidRequest as e:
            raise reworded(e, name) from None
        except SdtrtError as e:
            raise invalid(name("request"), e.problem, e.fix) from None
        self._check_scheduler(checked, name)
        texts = [(t, name(f)) for r in (rows if solo is None else []) for t, f in ((r.prompt, "prompt"), (r.negative, "negative_prompt"))]
        if solo is not None:
            texts = [(t, name("prompt")) for t in checked.prompts] + [(t, name("negative_prompt")) for t in (checked.negatives or [])]
        chunks = {self._prompt_size(t, f, checked.prompt_syntax) for t, f in texts if t}
        deadline = time.monotonic() + limits.timeout
        if solo is not None:
            self._check_image_size(checked, name)
            return Job(checked, [], loras, key=None, solo=checked, deadline=deadline)
        resolved = checked.replace(prompt="", negative_prompt=None, prompt_2=None, negative_prompt_2=None, seed=None,
                                   image=None, mask_image=None, num_images_per_prompt=1)
        height, width = (first.image.shape[2], first.image.shape[3]) if first.image is not None else (
            resolved.height or pipe.family.default_size(pipe.config)[0], resolved.width or pipe.family.default_size(pipe.config)[1])
        resolved = resolved.replace(height=height, width=width, scheduler=schedulers.resolve(resolved.scheduler or pipe.default_scheduler))
        mode = "txt2img" if first.image is None else ("inpaint" if first.mask is not None else "img2img")
        per_row = {(r.negative is None, r.negative_2 is None) for r in rows}
        if len(per_row) != 1:
            raise invalid(name("negative_prompt"), "a request mixes rows with and without a negative prompt.", "give every prompt one, or none")
        key = repr((mode, sorted((f.name, _hashable(getattr(resolved, f.name))) for f in dataclasses.fields(resolved)),
                    per_row.pop(), max(chunks, default=1) if checked.prompt_syntax == "a1111" else 1,
                    tuple((str(p), float(s)) for p, s in loras)))
        return Job(resolved, rows, loras, key=key, deadline=deadline)

    def _check_image_size(self, r: Request, name) -> None:
        """A solo request's output size when it comes from its image (no height/width given)."""
        image = r.image if r.image is not None else (r.per_controlnet("control_image")[0] if r.control_image is not None else None)
        size = getattr(image, "size", None)
        if size is None:
            return
        limit = self.settings.limits.max_size
        for side, v, given in (("width", size[0], r.width), ("height", size[1], r.height)):
            if given is None and v > limit:
                raise over_limit(name(side), v, limit, "--max-size")

    @staticmethod
    def _row_request(template: Request, row: Row) -> Request:
        return template.replace(prompt=row.prompt, negative_prompt=row.negative, prompt_2=row.prompt_2,
                                negative_prompt_2=row.negative_2, seed=row.seed, image=row.image, mask_image=row.mask,
                                num_images_per_prompt=1)

    def _check_scheduler(self, r: Request, name) -> None:
        """Make the scheduler the run will make: an unknown name or unusable options are refused before queueing."""
        try:
            key = schedulers.resolve(r.scheduler or self.pipe.default_scheduler)
        except SdtrtError as e:
            raise invalid(name("scheduler"), e.problem, e.fix) from None
        try:
            sched = schedulers.make(key, self.pipe.model.meta.scheduler_config, **dict(r.scheduler_options))
            limit = sched.config.num_train_timesteps
            sched.set_timesteps(min(r.steps, limit) if isinstance(limit, int) else r.steps)
        except (SdtrtError, TypeError, ValueError, RuntimeError, OverflowError, ZeroDivisionError) as e:
            detail = e.problem if isinstance(e, SdtrtError) else str(e).splitlines()[0][:120]
            raise invalid(name("scheduler_options"), f"the scheduler cannot use these options ({detail}).",
                          "give each option a value of its type, or drop it") from None
        if isinstance(limit, int) and r.steps > limit:
            raise invalid(name("steps"), f"steps={r.steps} is more than the model's {limit} training timesteps.", f"pass steps <= {limit}")

    def _prompt_size(self, text: str, field: str, syntax: str) -> int:
        """Chunks of 75 tokens the text takes (A1111 syntax; 1 for plain), refusing texts over --max-prompt-tokens."""
        from ..runtime.text import prompt_weights

        limit = self.settings.limits.max_prompt_tokens
        if len(text) > 20 * limit:  # no tokenizer run for megabytes of text: a token is at least one character
            raise over_limit(f"{field} length", f"{len(text)} characters", 20 * limit, "--max-prompt-tokens (x20 characters)")
        tok = self.pipe.tokenizer
        if syntax == "a1111":
            tokens = sum(len(tok.token_ids(t)) for t, w in prompt_weights.parse(text) if w != -1.0)
        else:
            tokens = len(tok.token_ids(text))
        if tokens > limit:
            raise ApiError(422, "limit_exceeded", f"{field} has {tokens} tokens, above this server's limit of {limit} (--max-prompt-tokens).",
                           field=field, fix=f"shorten {field} to {limit} tokens or fewer", limit="--max-prompt-tokens", max=limit)
        return prompt_weights.chunk(tok, text).ids.shape[0] if syntax == "a1111" else 1

    # --- queueing ------------------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        self.check_ready()
        try:
            self.batcher.submit(job)
        except QueueFull:
            self.metrics.rejected.labels("queue_full").inc()
            raise ApiError(503, "queue_full", f"the queue is full ({self.settings.max_queue} requests waiting).",
                           fix="retry after the Retry-After seconds", headers={"Retry-After": str(self.retry_after())}) from None
        except Stopped:
            raise ApiError(503, "shutting_down", "the server is shutting down.", headers={"Retry-After": "5"}) from None

    def retry_after(self) -> int:
        _, images = self.batcher.depth()
        batches = math.ceil(max(images, 1) / self.settings.max_batch)
        return max(1, math.ceil(batches * self._last_batch_seconds))

    def cancel(self, job: Job, reason: str) -> None:
        if not job.future.done() and not job.cancelled.is_set():
            self.metrics.cancelled.labels(reason).inc()
            self.batcher.cancel(job, reason)

    def _queue_changed(self) -> None:
        jobs, images = self.batcher.depth()
        self.metrics.queue_jobs.set(jobs)
        self.metrics.queue_images.set(images)

    # --- running -------------------------------------------------------------------------------------

    def _run_batch(self, batch: Batch) -> None:
        live = [(j, ix) for j, ix in batch.parts if not j.cancelled.is_set()]
        if not live:
            return
        batch.parts = live
        now = time.monotonic()
        for job, _ in live:
            if job.started is not None and "queue_wait" not in job.timings:
                job.timings["queue_wait"] = job.started - job.created
                self.metrics.stage.labels("queue_wait").observe(job.started - job.created)
        try:
            self._run(batch)
        except Cancelled as e:
            for job, _ in live:
                job.fail(e)
        except BaseException as e:  # noqa: BLE001 - delivered to each request; a merged batch retries its jobs alone
            if len(live) > 1 and isinstance(e, (SdtrtError, RuntimeError, ValueError)):
                log.warning("a batch of %d requests failed (%s); running each alone", len(live), e)
                for part in live:
                    self._run_batch(Batch([part]))
                return
            for job, _ in live:
                job.fail(e)
        finally:
            self._last_batch_seconds = max(0.05, time.monotonic() - now)

    def _run(self, batch: Batch) -> None:
        job0 = batch.parts[0][0]
        if job0.loras != self._loras:
            self.pipe.set_loras(list(job0.loras))
            self._loras = job0.loras
        if job0.solo is not None:
            result = self.pipe.run(job0.solo, progress=False, cancel=batch.event)
            rows = [RowResult(img, p) for img, p in zip(result.images, result.parameters)]
            job0.timings.update({k: v for k, v in result.timings.items() if isinstance(v, (int, float))})
            job0.finish_rows(list(range(len(rows))), rows)
            self._account(batch, len(rows), result.timings)
            return
        request, generators = merged_request(batch)
        result = self.pipe.run(request, generator=generators, progress=False, cancel=batch.event)
        i = 0
        for job, indices in batch.parts:
            out = []
            for index in indices:
                row = job.rows[index]
                params = {**result.parameters[i], "seed": row.seed, "prompt": row.text if row.text is not None else row.prompt}
                out.append(RowResult(result.images[i], params))
                i += 1
            job.timings.update({k: v for k, v in result.timings.items() if isinstance(v, (int, float))})
            job.finish_rows(indices, out)
        self._account(batch, i, result.timings)

    def _account(self, batch: Batch, images: int, timings: dict) -> None:
        self.metrics.batch(images, len(batch.parts), timings)
        self.metrics.images_done(images)


def _hashable(v: Any) -> Any:
    if isinstance(v, dict) or hasattr(v, "items"):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    return v


def reworded(e: InvalidRequest, name: Callable[[str], str]) -> ApiError:
    """The runtime's InvalidRequest in the front end's field names."""
    field = name(e.param)
    return invalid(field, f"{field}={e.value!r} {e.expected}.", f"pass {field}={e.example!r}{e.more}" + (f" ({e.note})" if e.note else ""))
