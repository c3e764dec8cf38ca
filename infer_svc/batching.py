"""Server-side dynamic batching: concurrent requests for one servable share a forward pass.

Each servable (model and version) has a lane: a queue of waiting requests
and at most one leader, the caller thread that is computing a forward pass
for the lane. There is no batcher thread, so a request pays no hand-off
between threads when nobody else is waiting:

- A request that finds its lane idle leads at once: it waits for company
  only if `max_delay` is set (until the batch has `max_batch_size` rows or
  its oldest request has waited `max_delay` seconds), takes every request
  waiting (up to `max_batch_size` rows), runs one forward pass and hands
  each request its rows.
- A request that finds a forward pass running waits in the queue. When the
  pass ends, its leader wakes the oldest waiting request, which leads the
  next pass over everything that queued meanwhile.

So the batch size follows the load: one row per pass when requests come one
at a time, up to `max_batch_size` rows when they queue behind a running pass
(Triton's dynamic batcher and TF Serving's with no queue delay do the same).
The queue is bounded (`max_queue_rows`, over all lanes): a request that does
not fit is refused at once with QueueFull rather than waiting without bound.
With batching off, each request runs its own forward pass on its caller's
thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
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


@dataclass(frozen=True)
class BatchStats:
    """What one forward pass did, for metrics."""

    rows: int
    requests: int
    queue_seconds: float  # how long the oldest request waited
    compute_seconds: float


@dataclass(eq=False)
class _Request:
    x: np.ndarray
    enqueued: float
    woken: threading.Event = field(default_factory=threading.Event)  # answered, or asked to lead
    leads: bool = False
    probabilities: np.ndarray | None = None
    error: BaseException | None = None

    def outcome(self) -> np.ndarray:
        if self.error is not None:
            raise self.error
        assert self.probabilities is not None, "woken without an answer"
        return self.probabilities


@dataclass(eq=False)
class _Lane:
    """One servable's waiting requests, and whether a leader is computing for them."""

    waiting: deque[_Request] = field(default_factory=deque)
    busy: bool = False


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
        self._lanes: dict[Forward, _Lane] = {}
        self._queued_rows = 0
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # a leader waiting out max_delay listens
        self._stopping = False

    def run(self, servable: Forward, x: np.ndarray) -> np.ndarray:
        """Probabilities for `x`, computed alone or batched with other requests."""
        if not self.enabled:
            started = self._clock()
            probabilities = servable.probabilities(x)
            self._on_batch(BatchStats(len(x), 1, 0.0, self._clock() - started))
            return probabilities
        request = _Request(x, self._clock())
        with self._lock:
            if self._stopping:
                raise BatcherStopped("the server is shutting down; retry on another replica")
            if self._queued_rows + len(x) > self.max_queue_rows:
                raise QueueFull(
                    f"the batching queue is full ({self._queued_rows} rows waiting, "
                    f"limit {self.max_queue_rows}); retry later"
                )
            lane = self._lanes.setdefault(servable, _Lane())
            lane.waiting.append(request)
            self._queued_rows += len(x)
            request.leads = not lane.busy  # an idle lane: this request computes, now
            lane.busy = True
            self._arrived.notify_all()
        if not request.leads:
            request.woken.wait()
        if request.leads:  # from the start, or handed the lane by the previous leader
            self._lead(servable, lane)
        return request.outcome()

    def stop(self) -> None:
        """Refuse new requests from now on; those already queued are still computed."""
        with self._lock:
            self._stopping = True
            self._arrived.notify_all()  # a leader waiting for company computes now

    def _lead(self, servable: Forward, lane: _Lane) -> None:
        """Compute one batch from the head of `lane` (the leader's own request is the head),
        answer it, and hand the lane to the oldest request still waiting."""
        batch = self._take_batch(lane)
        try:
            self._compute(servable, batch)
        finally:  # whatever happened, the lane goes on: the next request leads, or it idles
            with self._lock:
                if lane.waiting:
                    lane.waiting[0].leads = True
                    lane.waiting[0].woken.set()
                else:
                    lane.busy = False
                    del self._lanes[servable]
            for request in batch:
                request.woken.set()  # the leader's own is set too: harmless, it is not waiting

    def _compute(self, servable: Forward, batch: list[_Request]) -> None:
        """One forward pass over `batch`; each request gets its rows, or the pass's error."""
        started = self._clock()
        try:
            rows = batch[0].x if len(batch) == 1 else np.concatenate([r.x for r in batch])  # alone: no copy
            probabilities = servable.probabilities(rows)
        except Exception as error:  # noqa: BLE001 - handed to every request of the batch
            for request in batch:
                request.error = error
            return
        self._on_batch(
            BatchStats(len(probabilities), len(batch), started - batch[0].enqueued, self._clock() - started)
        )
        start = 0
        for request in batch:
            request.probabilities = probabilities[start : start + len(request.x)]
            start += len(request.x)

    def _take_batch(self, lane: _Lane) -> list[_Request]:
        """Requests from the head of `lane` up to `max_batch_size` rows (at least the head),
        after waiting until there are that many or the head has waited `max_delay`."""
        with self._lock:
            waiting = lane.waiting
            deadline = waiting[0].enqueued + self.max_delay
            while (
                sum(len(r.x) for r in waiting) < self.max_batch_size
                and (remaining := deadline - self._clock()) > 0
                and not self._stopping
            ):
                self._arrived.wait(timeout=remaining)
            batch = [waiting.popleft()]
            rows = len(batch[0].x)
            while waiting and rows + len(waiting[0].x) <= self.max_batch_size:
                rows += len(waiting[0].x)
                batch.append(waiting.popleft())
            self._queued_rows -= rows
        return batch
