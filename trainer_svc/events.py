"""Progress events of running jobs, fanned out to any number of watchers.

Each watcher has its own bounded buffer of step events: a slow watcher
loses its oldest step events rather than slowing training down (the
others, a few per epoch, are always kept), and a watcher that goes away
costs nothing once it unsubscribes. When a job ends, its watchers are told
so after the last event.

In a pool of trainers the hub's `relay` (event_log.EventRelay) also copies
each event into the job's Redis stream, which WatchJob on the other
trainers reads. A watcher here of a job another trainer takes over (this
one stalled and lost its lease) is told `JobMoved`: it watches again, and
is answered from the stream.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from trainer_svc.jobs import JobRecord


@dataclass(frozen=True)
class StepProgress:
    epoch: int
    step: int
    steps_per_epoch: int
    batch_loss: float
    batch_accuracy: float
    samples_per_second: float


@dataclass(frozen=True)
class EpochDone:
    metrics: dict


@dataclass(frozen=True)
class CheckpointPublished:
    meta: dict  # the checkpoint's metadata, its version included


@dataclass(frozen=True)
class JobSnapshot:
    """The job changed state without ending (running, cancelling, interrupted)."""

    record: JobRecord


@dataclass(frozen=True)
class JobFinished:
    record: JobRecord


@dataclass(frozen=True)
class JobMoved:
    """Another trainer holds the job now: this trainer's watchers hear no more of it."""


class WatchMoved(RuntimeError):
    """A watch that must start again (UNAVAILABLE: a client retries it), since the job moved."""


Event = StepProgress | EpochDone | CheckpointPublished | JobSnapshot | JobFinished | JobMoved


class Subscription:
    """One watcher's buffer of a job's events."""

    def __init__(self, hub: EventHub, job_id: str, capacity: int):
        self._hub, self.job_id = hub, job_id
        self._events: deque[Event] = deque()
        self._capacity = capacity
        self._steps = 0  # how many of the buffered events are StepProgress
        self._ready = threading.Condition()

    def push(self, event: Event) -> None:
        with self._ready:
            if isinstance(event, StepProgress):
                if self._steps >= self._capacity:
                    self._drop_oldest_step()
                self._steps += 1
            self._events.append(event)
            self._ready.notify_all()

    def _drop_oldest_step(self) -> None:
        for index, buffered in enumerate(self._events):
            if isinstance(buffered, StepProgress):
                del self._events[index]
                self._steps -= 1
                return

    def next(self, timeout: float) -> Event | None:
        """The next event, or None if none came within `timeout` seconds."""
        with self._ready:
            self._ready.wait_for(lambda: self._events, timeout)
            if not self._events:
                return None
            event = self._events.popleft()
            self._steps -= isinstance(event, StepProgress)
            return event

    def close(self) -> None:
        self._hub._unsubscribe(self)


class EventHub:
    def __init__(self, capacity: int = 1024, relay: Callable[[str, Event], None] | None = None):
        self._capacity = capacity
        self._relay = relay
        self._watchers: dict[str, set[Subscription]] = {}
        self._followers: Counter[str] = Counter()  # watches fed from the job's stream instead
        self._lock = threading.Lock()

    def subscribe(self, job_id: str) -> Subscription:
        subscription = Subscription(self, job_id, self._capacity)
        with self._lock:
            self._watchers.setdefault(job_id, set()).add(subscription)
        return subscription

    def publish(self, job_id: str, event: Event) -> None:
        """Tell the job's watchers here, and (with a relay) those on every other trainer."""
        self.tell_watchers(job_id, event)
        if self._relay is not None:
            self._relay(job_id, event)

    def tell_watchers(self, job_id: str, event: Event) -> None:
        """Tell the job's watchers on this trainer only."""
        with self._lock:
            watchers = list(self._watchers.get(job_id, ()))
        for subscription in watchers:
            subscription.push(event)

    def count_follower(self, job_id: str) -> Callable[[], None]:
        """Count a watch of the job that reads its stream (event_log.StreamSubscription) among its
        watchers here; the watch calls what this returns when it closes."""
        with self._lock:
            self._followers[job_id] += 1

        def closed() -> None:
            with self._lock:
                self._followers[job_id] -= 1
                if not self._followers[job_id]:
                    del self._followers[job_id]

        return closed

    def watcher_count(self, job_id: str) -> int:
        """The open watches of the job on this trainer, of either kind."""
        with self._lock:
            return len(self._watchers.get(job_id, ())) + self._followers[job_id]

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            watchers = self._watchers.get(subscription.job_id)
            if watchers is not None:
                watchers.discard(subscription)
                if not watchers:
                    del self._watchers[subscription.job_id]
