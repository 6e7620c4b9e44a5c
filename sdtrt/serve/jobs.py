"""What the batcher moves: a job (one HTTP request) is a list of rows (one image each, with its own
seed) plus the settings every row shares. Rows of jobs with the same `key` can run in one
`Pipeline.run` call, one generator per row, and each gets exactly the image it would get alone."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..runtime.request import Request


@dataclasses.dataclass
class Row:
    prompt: str  # the text the encoder sees (A1111 <lora:...> tags removed)
    seed: int
    negative: str | None = None
    prompt_2: str | None = None
    negative_2: str | None = None
    image: torch.Tensor | None = None  # [1,3,H,W] in [0, 1], already at the output size
    mask: torch.Tensor | None = None  # [1,1,H,W] in [0, 1]
    text: str | None = None  # the prompt as the client wrote it (kept in the PNG parameters, as A1111 does)


@dataclasses.dataclass
class RowResult:
    image: Any  # PIL image
    parameters: dict[str, Any]  # what made it (Result.parameters, with this row's seed and prompt)


class Job:
    """One request's work. `template` holds every shared, resolved setting (per-row fields blank);
    `solo` is a request that runs as it is, alone (several images from one seed, ControlNet)."""

    def __init__(self, template: Request, rows: list[Row], loras: tuple[tuple[Path, float], ...] = (),
                 key: str | None = None, solo: Request | None = None, deadline: float | None = None):
        self.template, self.rows, self.loras, self.key, self.solo = template, rows, loras, key, solo
        self.created = time.monotonic()
        self.deadline = deadline
        self.cancelled = threading.Event()
        self.cancel_reason: str | None = None
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.size = len(rows) if solo is None else solo.batch  # images it makes
        self.results: list[RowResult | None] = [None] * self.size
        self.next_row = 0  # rows before this are taken by a batch
        self.batches: list["Batch"] = []  # running batches holding some of its rows
        self.timings: dict[str, float] = {}
        self.started: float | None = None

    @property
    def remaining(self) -> int:
        return self.size - self.next_row

    def finish_rows(self, indices: list[int], results: list[RowResult]) -> None:
        for i, r in zip(indices, results):
            self.results[i] = r
        if all(r is not None for r in self.results) and not self.future.done():
            self.future.set_result(self.results)

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclasses.dataclass
class Batch:
    """Rows from one or more jobs that run as one call; cancelled once every job in it is."""

    parts: list[tuple[Job, list[int]]]  # (job, its row indices) in order
    event: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def jobs(self) -> list[Job]:
        return [j for j, _ in self.parts]

    @property
    def images(self) -> int:
        return sum(len(ix) for _, ix in self.parts)

    def job_cancelled(self) -> None:
        if all(j.cancelled.is_set() for j in self.jobs):
            self.event.set()

    def rows(self) -> list[Row]:
        return [j.rows[i] for j, ix in self.parts for i in ix]


def merged_request(batch: Batch) -> tuple[Request, list[torch.Generator]]:
    """One Request for all rows of a batch (one prompt each) and one generator per row."""
    rows = batch.rows()
    template = batch.parts[0][0].template
    negatives = None if all(r.negative is None for r in rows) else [r.negative or "" for r in rows]
    second = any(r.prompt_2 is not None for r in rows)
    negatives_2 = any(r.negative_2 is not None for r in rows)
    images = [r.image for r in rows]
    masks = [r.mask for r in rows]
    request = template.replace(
        prompt=[r.prompt for r in rows], negative_prompt=negatives,
        prompt_2=[r.prompt_2 if r.prompt_2 is not None else r.prompt for r in rows] if second else None,
        negative_prompt_2=[r.negative_2 if r.negative_2 is not None else (r.negative or "") for r in rows] if negatives_2 else None,
        num_images_per_prompt=1, seed=None,
        image=torch.cat(images) if images[0] is not None else None,
        mask_image=torch.cat(masks) if masks[0] is not None else None)
    return request, [torch.Generator("cpu").manual_seed(r.seed) for r in rows]


Runner = Callable[[Batch], None]
