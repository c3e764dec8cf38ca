"""Server-side dynamic batching: concurrent requests for one servable share a forward pass.

Requests wait in a queue per servable (model and version). One worker
takes the oldest waiting request and gathers more for the same servable
until it has `max_batch_size` rows or the oldest has waited `max_delay`
seconds, runs one forward pass, and hands each request its rows. The
queue is bounded (`max_queue_rows`): a request that does not fit is
refused at once with QueueFull rather than waiting without bound.
With batching off, each request runs its own forward pass on its caller's
thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class Forward(Protocol):
    """What the batcher runs: an infer_svc.servable.Servable (queued by identity), or a stand-in."""

    def probabilities(self, x: np.ndarray) -> np.ndarray: ...


class QueueFull(RuntimeError):
    """The batching queue has no room for the request."""


class BatcherStopped(RuntimeError):
    """The batcher has stopped (the server is shutting down): nothing would compute the request."""


@dataclass
class _Request:
    x: np.ndarray
    enqueued: float
    result: Future = field(default_factory=Future)


@dataclass(frozen=True)
class BatchStats:
    """What one forward pass did, for metrics."""

    rows: int
    requests: int
    queue_seconds: float  # how long the oldest request waited
    compute_seconds: float


class Batcher:
    def __init__(
        self,
        *,
        enabled: bool = True,
        max_batch_size: int = 64,
        max_delay: float = 0.0,
        max_queue_rows: int = 4096,
        on_batch: Callable[[BatchStats], None] = lambda s: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.enabled = enabled
        self.max_batch_size, self.max_delay, self.max_queue_rows = max_batch_size, max_delay, max_queue_rows
        self._on_batch, self._clock = on_batch, clock
        self._queues: dict[Forward, deque[_Request]] = {}
        self._queued_rows = 0
        self._changed = threading.Condition()
        self._stopping = False
        self._worker = threading.Thread(target=self._work, name="batcher", daemon=True)
        if enabled:
            self._worker.start()

    def run(self, servable: Forward, x: np.ndarray) -> np.ndarray:
        """Probabilities for `x`, computed alone or batched with other requests."""
        if not self.enabled:
            started = self._clock()
            probabilities = servable.probabilities(x)
            self._on_batch(BatchStats(len(x), 1, 0.0, self._clock() - started))
            return probabilities
        request = _Request(x, self._clock())
        with self._changed:
            if self._stopping:
                raise BatcherStopped("the server is shutting down; retry on another replica")
            if self._queued_rows + len(x) > self.max_queue_rows:
                raise QueueFull(
                    f"the batching queue is full ({self._queued_rows} rows waiting, "
                    f"limit {self.max_queue_rows}); retry later"
                )
            self._queues.setdefault(servable, deque()).append(request)
            self._queued_rows += len(x)
            self._changed.notify_all()
        return request.result.result()

    def stop(self) -> None:
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self.enabled:
            self._worker.join(timeout=5)

    def _work(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._stopping or any(self._queues.values()))
                if self._stopping and not any(self._queues.values()):
                    return
                servable, batch = self._gather()
            self._compute(servable, batch)

    def _gather(self) -> tuple[Forward, list[_Request]]:
        """Pick the servable whose head waited longest; wait for a full batch or its deadline."""
        servable = min((s for s, q in self._queues.items() if q), key=lambda s: self._queues[s][0].enqueued)
        waiting = self._queues[servable]
        deadline = waiting[0].enqueued + self.max_delay
        while (
            sum(len(r.x) for r in waiting) < self.max_batch_size
            and (remaining := deadline - self._clock()) > 0
            and not self._stopping
        ):
            self._changed.wait(timeout=remaining)
        batch = [waiting.popleft()]
        rows = len(batch[0].x)
        while waiting and rows + len(waiting[0].x) <= self.max_batch_size:
            rows += len(waiting[0].x)
            batch.append(waiting.popleft())
        if not waiting:
            del self._queues[servable]
        self._queued_rows -= rows
        return servable, batch

    def _compute(self, servable: Forward, batch: list[_Request]) -> None:
        started = self._clock()
        try:
            probabilities = servable.probabilities(np.concatenate([r.x for r in batch]))
        except Exception as error:  # noqa: BLE001 - handed to every waiting caller
            for request in batch:
                request.result.set_exception(error)
            return
        finished = self._clock()
        self._on_batch(
            BatchStats(len(probabilities), len(batch), started - batch[0].enqueued, finished - started)
        )
        start = 0
        for request in batch:
            request.result.set_result(probabilities[start : start + len(request.x)])
            start += len(request.x)
