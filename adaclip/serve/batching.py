"""Dynamic batching: requests that arrive within a few milliseconds are encoded as one batch.

Request handlers (on the event loop) admit images against a bounded capacity (`reserve`: a full
queue refuses at once, before any decoding) and submit `Job`s with the uploaded bytes; one worker
thread decodes and encodes them, as `predict` does in one process (decoding in a pool of threads
beside the encoder made torch's thread teams compete for the cores: twice the CPU per image on
2 cores). The worker takes the oldest job
and every other waiting job with the same encoder key (the same image tower), up to `max_batch`
images, waiting at most `wait_s` after the oldest arrived. Under load the queue is never empty, so
batches fill without waiting; alone, a request waits `wait_s` at most.

The worker also runs control tasks (a reload) between batches, so adapters never change under a
forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..predictions import Prediction
from ..ui import log
from .inputs import PreparedImage, Upload, prepare_images
from .metrics import ServeMetrics
from .registry import ServedAdapter


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        self.retry_after = retry_after
        super().__init__(f"queue full, retry after {retry_after} s")


class ShuttingDown(Exception):
    pass


@dataclass
class HeadRequest:
    """One adapter to answer for a job's images, with its class list (None: its own) and top-k."""

    adapter: ServedAdapter
    class_names: list[str] | None
    top_k: int


@dataclass
class Job:
    """A request's images for one image tower, and the adapters to answer with."""

    key: tuple[str, ...]
    encoder: ServedAdapter  # whose `encode` computes the features for every head
    uploads: list[Upload]
    heads: list[HeadRequest]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    max_pixels: int = 25_000_000
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def size(self) -> int:
        return len(self.uploads)


@dataclass
class JobResult:
    """Every upload's decoding outcome (in order) and, per head, predictions for the readable ones."""

    images: list[PreparedImage]
    predictions: list[list[Prediction]]


class Batcher:
    def __init__(self, *, max_batch: int, wait_s: float, capacity: int, metrics: ServeMetrics):
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.capacity = capacity
        self.metrics = metrics
        self._cond = threading.Condition()
        self._jobs: deque[Job] = deque()
        self._controls: deque[tuple[Callable[[], Any], asyncio.Future, asyncio.AbstractEventLoop]] = deque()
        self._admitted = 0  # images reserved by handlers and not yet taken into a batch
        self._held = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._images_per_second = 0.0  # moving estimate, for Retry-After

    # --- admission (event loop) -------------------------------------------------------------------

    def reserve(self, images: int) -> None:
        """Admit `images` or raise QueueFull (nothing decoded yet, so refusing costs nothing)."""
        with self._cond:
            if self._stopping:
                raise ShuttingDown()
            if self._admitted + images > self.capacity:
                raise QueueFull(self._retry_after())
            self._admitted += images
            self.metrics.queue.set(self._admitted)

    def release(self, images: int) -> None:
        """Give back admitted images that will not be submitted (unreadable uploads, errors)."""
        with self._cond:
            self._admitted -= images
            self.metrics.queue.set(self._admitted)

    def submit(self, job: Job) -> None:
        """Queue a job whose images were reserved."""
        with self._cond:
            if self._stopping:
                self._admitted -= job.size
                raise ShuttingDown()
            self._jobs.append(job)
            self._cond.notify()

    def run_between_batches(self, task: Callable[[], Any]) -> asyncio.Future:
        """Run `task` on the worker thread between two batches; the future gets its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            self._controls.append((task, future, loop))
            self._cond.notify()
        return future

    @property
    def full(self) -> bool:
        return self._admitted >= self.capacity

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _retry_after(self) -> int:
        rate = self._images_per_second
        return max(1, min(60, math.ceil(self._admitted / rate))) if rate > 0 else 1

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="adaclip-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress; jobs still waiting fail with ShuttingDown."""
        with self._cond:
            self._stopping = True
            self._held = False
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Take no batch while inside (jobs queue up): lets tests fill the queue deterministically."""
        with self._cond:
            self._held = True
        try:
            yield
        finally:
            with self._cond:
                self._held = False
                self._cond.notify_all()

    # --- worker thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            control, batch = None, None
            with self._cond:
                while not self._stopping and (self._held or not (self._jobs or self._controls)):
                    self._cond.wait()
                if self._stopping:
                    break
                if self._controls:
                    control = self._controls.popleft()
                else:
                    batch = self._gather()
            if control is not None:
                self._run_control(*control)
            elif batch:
                self._process(batch)
        with self._cond:
            leftover, self._jobs = list(self._jobs), deque()
            controls, self._controls = list(self._controls), deque()
        for job in leftover:
            _deliver(job.loop, job.future, error=ShuttingDown())
        for _, future, loop in controls:
            _deliver(loop, future, error=ShuttingDown())

    def _gather(self) -> list[Job]:
        """Called with the lock held: the oldest job plus waiting jobs for the same image tower."""
        key = self._jobs[0].key
        deadline = self._jobs[0].enqueued + self.wait_s
        while not self._stopping and not self._held:
            waiting = sum(job.size for job in self._jobs if job.key == key)
            remaining = deadline - time.monotonic()
            if waiting >= self.max_batch or remaining <= 0:
                break
            self._cond.wait(remaining)
        batch: list[Job] = []
        images = 0
        for job in list(self._jobs):
            if job.key == key and (not batch or images + job.size <= self.max_batch):
                batch.append(job)
                images += job.size
        for job in batch:
            self._jobs.remove(job)
        self._admitted -= images
        self.metrics.queue.set(self._admitted)
        return batch

    def _run_control(self, task: Callable[[], Any], future: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        try:
            result = task()
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            _deliver(loop, future, error=exc)
        else:
            _deliver(loop, future, result=result)

    def _process(self, batch: list[Job]) -> None:
        live = [job for job in batch if not job.future.done()]  # a timed-out request needs no answer
        if not live:
            return
        started = time.perf_counter()
        try:
            images = [self._decode(job) for job in live]
            pixels = [p.pixels["image"] for prepared in images for p in prepared if p.pixels is not None]
            rows = [sum(p.pixels is not None for p in prepared) for prepared in images]
            answers: list[list[list[Prediction]]] = [[[] for _ in job.heads] for job in live]
            if pixels:
                stacked = torch.stack(pixels)
                encoder = live[0].encoder
                features = torch.cat(
                    [encoder.encode(stacked[i : i + self.max_batch]) for i in range(0, len(stacked), self.max_batch)]
                )
                self.metrics.batch_images.observe(len(stacked))
                self.metrics.encoded.inc(len(stacked))
                answers = self._answer(live, rows, features)
        except Exception as exc:  # noqa: BLE001 - one failed batch must not stop the worker
            log.error(f"batch of {len(batch)} requests failed: {type(exc).__name__}: {exc}")
            for job in live:
                _deliver(job.loop, job.future, error=exc)
            return
        seconds = time.perf_counter() - started
        if seconds > 0 and pixels:
            rate = len(pixels) / seconds
            previous = self._images_per_second
            self._images_per_second = rate if not previous else 0.8 * previous + 0.2 * rate
        for job, prepared, answer in zip(live, images, answers, strict=True):
            _deliver(job.loop, job.future, result=JobResult(prepared, answer))

    @staticmethod
    def _decode(job: Job) -> list[PreparedImage]:
        transform = job.encoder.adapter.backbone.eval_transform()
        return prepare_images(job.uploads, {"image": transform}, job.max_pixels)

    @staticmethod
    def _answer(jobs: list[Job], rows: list[int], features: torch.Tensor) -> list[list[list[Prediction]]]:
        """Per job, per head: predictions for its readable images. Rows of jobs asking the same adapter
        and classes go through its head together."""
        offsets, start = [], 0
        for count in rows:
            offsets.append((start, start + count))
            start += count
        answers: list[list[list[Prediction]]] = [[[] for _ in job.heads] for job in jobs]
        groups: dict[tuple, list[tuple[int, int]]] = {}
        for j, job in enumerate(jobs):
            if rows[j] == 0:
                continue
            for h, head in enumerate(job.heads):
                key = (id(head.adapter), tuple(head.class_names) if head.class_names is not None else None)
                groups.setdefault(key, []).append((j, h))
        for members in groups.values():
            first = jobs[members[0][0]].heads[members[0][1]]
            features_of_group = torch.cat([features[slice(*offsets[j])] for j, _ in members])
            top_k = [jobs[j].heads[h].top_k for j, h in members for _ in range(rows[j])]
            predictions = first.adapter.predict_features(features_of_group, top_k, first.class_names)
            position = 0
            for j, h in members:
                answers[j][h] = predictions[position : position + rows[j]]
                position += rows[j]
        return answers


def _deliver(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future, *, result: Any = None, error: BaseException | None = None
):
    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
        loop.call_soon_threadsafe(settle)
