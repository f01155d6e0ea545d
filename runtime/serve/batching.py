"""The request queue in front of the model: one worker thread owns the `Octopus` object.

Requests become `Job`s. The worker takes the oldest job; when it is a question (`ask`) it also takes
the next waiting questions, up to `max_batch`, and hands them to `Octopus.ask_batch` at once (no
waiting for a batch to fill: at low load a batch is one request, under load it grows by itself).
Other calls (score, choose, warm-up) run one at a time in arrival order. The model is only ever
touched from this thread, so neither onnxruntime sessions nor the per-image cache see concurrent use.

Back-pressure and cancellation: `submit` refuses a job when `max_queue` jobs already wait
(`QueueFull`, with a Retry-After estimate). `cancel` takes a waiting job out of the queue at once
(its slot is free) and makes a running question stop at its next token: each question's
`AskOptions.on_token` hook raises `Cancelled` once its job is cancelled, which ends that item of
the batch only (the `ask_batch` contract).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from octopus_rt.runtime.results import AskOptions

__all__ = ["Batcher", "Job", "QueueFull", "Cancelled"]

log = logging.getLogger("octopus_rt.serve")


class QueueFull(Exception):
    """The queue holds `max_queue` waiting jobs; `retry_after` is a whole-second estimate."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """The job was cancelled (client disconnected or past the timeout) before it finished."""


@dataclasses.dataclass(eq=False)
class Job:
    """kind "ask": image (RGB array or bytes), question, options; kind "call": fn(model) -> result.
    on_delta(text) receives streamed text on the worker thread. future gets the result or exception."""

    kind: str
    image: Any = None
    question: str = ""
    options: AskOptions | None = None
    fn: Callable[[Any], Any] | None = None
    on_delta: Callable[[str], None] | None = None
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    enqueued: float = dataclasses.field(default_factory=time.perf_counter)


class Batcher:
    """model: an `Octopus`; metrics: a serve.metrics.Metrics or None."""

    def __init__(self, model: Any, max_batch: int = 8, max_queue: int = 64, metrics: Any = None) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
        self.model, self.max_batch, self.max_queue, self.metrics = model, max_batch, max_queue, metrics
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seconds_per_job = 1.0  # running mean of service time, for Retry-After

    # ------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="octopus-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            waiting = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in waiting:
            job.cancelled.set()
            _settle(job.future, exception=Cancelled("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def depth(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------------------ submitting
    def retry_after(self) -> int:
        return max(1, math.ceil(self._seconds_per_job * (self.depth / self.max_batch + 1)))

    def check_room(self) -> None:
        """QueueFull when a new job would not fit (checked before the costly parts of a request)."""
        if self.depth >= self.max_queue:
            raise QueueFull(self.retry_after())

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stopping:
                raise Cancelled("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self._queue.append(job)
            self._gauge()
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Free the job's slot: out of the queue if still waiting, stopped at its next token if running."""
        job.cancelled.set()
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                return
            self._gauge()
        _settle(job.future, exception=Cancelled("cancelled while waiting"))

    # ---------------------------------------------------------------------------------- worker
    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))

    def _take(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            batch = [self._queue.popleft()]
            if batch[0].kind == "ask":
                others: list[Job] = []
                while self._queue and len(batch) < self.max_batch:
                    job = self._queue.popleft()
                    (batch if job.kind == "ask" else others).append(job)
                self._queue.extendleft(reversed(others))
            self._gauge()
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            start = time.perf_counter()
            batch = [job for job in batch if _runnable(job)]
            if not batch:
                continue
            if self.metrics is not None:
                for job in batch:
                    self.metrics.stage.labels("queue_wait").observe(start - job.enqueued)
            try:
                if batch[0].kind == "ask":
                    self._ask(batch)
                else:
                    _settle(batch[0].future, result=batch[0].fn(self.model))
            except Exception as exc:  # noqa: BLE001 - the worker must survive any request; logged once
                log.exception("model call failed")
                for job in batch:
                    _settle(job.future, exception=exc)
            elapsed = (time.perf_counter() - start) / len(batch)
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * elapsed

    def _ask(self, batch: list[Job]) -> None:
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
        options = [dataclasses.replace(job.options or AskOptions(), on_token=_hook(job)) for job in batch]
        results = self.model.ask_batch([job.image for job in batch], [job.question for job in batch], options)
        for job, result in zip(batch, results):
            if isinstance(result, Exception):
                _settle(job.future, exception=result)
            else:
                if self.metrics is not None:
                    self.metrics.answer(result)
                _settle(job.future, result=result)


def _runnable(job: Job) -> bool:
    """Mark the job running; False (and the future settled) when it was cancelled meanwhile."""
    if job.cancelled.is_set():
        _settle(job.future, exception=Cancelled("cancelled while waiting"))
        return False
    return job.future.set_running_or_notify_cancel()


def _hook(job: Job) -> Callable[[str], None]:
    def on_token(delta: str) -> None:
        if job.cancelled.is_set():
            raise Cancelled("cancelled while decoding")
        if delta and job.on_delta is not None:
            job.on_delta(delta)

    return on_token


def _settle(future: concurrent.futures.Future, *, result: Any = None, exception: BaseException | None = None) -> None:
    """Set a future's outcome unless it already has one (a cancelled waiter, a shutdown)."""
    if future.done():
        return
    try:
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass
