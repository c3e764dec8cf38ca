"""A job's events in Redis, so that WatchJob on any trainer of the pool follows a job trained on another.

The trainer that holds a job publishes its events to its own watchers
(events.py) and, through an `EventRelay`, appends them to a Redis Stream of
the job's, `tandem:job:ID:events`. A trainer asked to watch a job it does
not hold reads that stream (`StreamSubscription`, XREAD BLOCK) from where
it stood when the watch began. The stream outlives a take-over: the next
owner appends to the same one, so a remote watch carries on through it.

Why a stream, not pub/sub: a watcher that starts just before an event, or
whose connection drops for a moment, reads on from the last entry it saw;
pub/sub would lose what was said meanwhile. The stream is capped
(MAXLEN ~ STREAM_LENGTH: step events are a few a second) and expires a week
after its last event.

The relay runs on a thread of its own, since the training thread never
waits for Redis; while Redis is away it keeps up to `capacity` events
(dropping step events first, as a slow local watcher does) and sends them
once Redis answers. Entries are JSON, read back into the same event types;
an entry that does not parse is skipped with a warning, never evaluated.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict
from typing import cast

import redis

from shared.checkpoints.backoff import Backoff
from shared.checkpoints.redis_client import StoreUnavailable, unavailable_on_error
from trainer_svc.events import CheckpointPublished, EpochDone, Event, JobFinished, JobSnapshot, StepProgress
from trainer_svc.jobs import JobRecord

log = logging.getLogger("tandem.trainer.events")
STREAM_LENGTH = 2000  # entries kept per job (approximately: MAXLEN ~)
STREAM_TTL_MS = 7 * 24 * 3600 * 1000
READ_BATCH = 200


def encode(event: Event) -> dict[str, str]:
    if isinstance(event, StepProgress):
        kind, data = "step", json.dumps(asdict(event))
    elif isinstance(event, EpochDone):
        kind, data = "epoch", json.dumps(event.metrics)
    elif isinstance(event, CheckpointPublished):
        kind, data = "checkpoint", json.dumps(event.meta)
    elif isinstance(event, JobSnapshot):
        kind, data = "snapshot", event.record.to_json()
    elif isinstance(event, JobFinished):
        kind, data = "finished", event.record.to_json()
    else:  # JobMoved is this trainer's own news (EventHub.tell_watchers), never relayed
        raise TypeError(f"{type(event).__name__} is not kept in streams")
    return {"kind": kind, "data": data}


def decode(fields: dict[bytes, bytes]) -> Event:
    """The event an entry holds; ValueError, KeyError or TypeError if it is not one of encode's."""
    kind, data = fields[b"kind"].decode(), fields[b"data"]
    if kind == "step":
        return StepProgress(**json.loads(data))
    if kind == "epoch":
        return EpochDone(json.loads(data))
    if kind == "checkpoint":
        return CheckpointPublished(json.loads(data))
    if kind == "snapshot":
        return JobSnapshot(JobRecord.from_json(data))
    if kind == "finished":
        return JobFinished(JobRecord.from_json(data))
    raise ValueError(f"unknown event kind {kind!r}")


class JobEventLog:
    """The jobs' event streams in one Redis under `prefix`."""

    def __init__(self, client: redis.Redis, prefix: str = "tandem"):
        self._redis, self._prefix = client, prefix

    def key(self, job_id: str) -> str:
        return f"{self._prefix}:job:{job_id}:events"

    def append(self, events: list[tuple[str, Event]]) -> None:
        """Append (job id, event) pairs, in order, in one round trip. Raises StoreUnavailable."""
        with unavailable_on_error(self._redis):
            pipe = self._redis.pipeline(transaction=False)
            for job_id, event in events:
                fields: dict = encode(event)  # redis-py's dict type is invariant: dict[str, str] fails it
                pipe.xadd(self.key(job_id), fields, maxlen=STREAM_LENGTH, approximate=True)
            for job_id in {job_id for job_id, _ in events}:
                pipe.pexpire(self.key(job_id), STREAM_TTL_MS)
            pipe.execute()

    def last_id(self, job_id: str) -> str:
        """The id of the job's latest entry ("0-0" for none): a watch reads what comes after it."""
        with unavailable_on_error(self._redis):
            latest = cast(list, self._redis.xrevrange(self.key(job_id), count=1))
        return latest[0][0].decode() if latest else "0-0"

    def read(self, job_id: str, after: str, timeout: float) -> list[tuple[str, Event | None]]:
        """The entries after `after`, waiting up to `timeout` seconds for one; None for one that
        does not parse (skipped, but read past). Raises StoreUnavailable."""
        with unavailable_on_error(self._redis):
            reply = cast(
                list,
                self._redis.xread(
                    {self.key(job_id): after}, count=READ_BATCH, block=max(1, int(timeout * 1000))
                ),
            )
        entries: list[tuple[str, Event | None]] = []
        for _stream, messages in reply or []:
            for raw_id, fields in messages:
                entry_id = raw_id.decode()
                try:
                    entries.append((entry_id, decode(fields)))
                except (ValueError, KeyError, TypeError) as error:
                    log.warning(
                        "event=event_entry_skipped job=%s id=%s error=%r", job_id, entry_id, str(error)
                    )
                    entries.append((entry_id, None))
        return entries


class StreamSubscription:
    """One watcher's view of a job held by another trainer: its stream, from `after` on."""

    def __init__(self, events: JobEventLog, job_id: str, after: str, on_close: Callable[[], None]):
        self._events, self.job_id, self._after = events, job_id, after
        self._on_close = on_close
        self._buffer: deque[Event] = deque()

    def next(self, timeout: float) -> Event | None:
        """The next event, or None if none came within `timeout` seconds (or Redis is away)."""
        if not self._buffer:
            try:
                entries = self._events.read(self.job_id, self._after, timeout)
            except StoreUnavailable as error:  # the watch goes on; the next read starts where this one did
                log.warning("event=event_stream_unavailable job=%s error=%r", self.job_id, str(error))
                return None
            for entry_id, event in entries:
                self._after = entry_id
                if event is not None:
                    self._buffer.append(event)
        return self._buffer.popleft() if self._buffer else None

    def close(self) -> None:
        """The stream stays for other watchers; only the watch count (EventHub's) changes."""
        self._on_close()


class EventRelay:
    """Appends the events published on this trainer to their jobs' streams, off the publishing thread."""

    def __init__(self, events: JobEventLog, capacity: int = 10_000):
        self._events, self._capacity = events, capacity
        self._pending: deque[tuple[str, Event]] = deque()
        self._changed = threading.Condition()
        self._sending = False  # a batch taken from _pending is on its way to Redis
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="event-relay", daemon=True)
        self._thread.start()

    def __call__(self, job_id: str, event: Event) -> None:
        with self._changed:
            if len(self._pending) >= self._capacity:
                self._drop_one()
            self._pending.append((job_id, event))
            self._changed.notify_all()

    def _drop_one(self) -> None:
        """Make room while Redis is away: the oldest step event goes, else the oldest event."""
        for index, (_, event) in enumerate(self._pending):
            if isinstance(event, StepProgress):
                del self._pending[index]
                return
        self._pending.popleft()

    def flush(self, timeout: float) -> bool:
        """Wait until every event published so far is in Redis (True), or `timeout` passed (False)."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending and not self._sending, timeout)

    def close(self, timeout: float) -> None:
        """Send what is pending (within `timeout`), then stop."""
        self.flush(timeout)
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join(timeout=1.0)

    def _run(self) -> None:
        backoff = Backoff(0.2, 5.0)
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending or self._closing)
                if self._closing:
                    return
                batch = [self._pending.popleft() for _ in range(min(READ_BATCH, len(self._pending)))]
                self._sending = True
            try:
                self._events.append(batch)
                backoff.reset()
            except StoreUnavailable as error:  # kept, in order, for when Redis answers again
                log.warning("event=event_relay_failed events=%d error=%r", len(batch), str(error))
                with self._changed:
                    self._pending.extendleft(reversed(batch))
                    while len(self._pending) > self._capacity:
                        self._drop_one()
                    self._sending = False
                    if self._changed.wait_for(lambda: self._closing, timeout=backoff.next()):
                        return
                continue
            except redis.RedisError as error:  # refused (an ACL without XADD): no retry helps
                log.error("event=event_relay_refused events=%d error=%r", len(batch), str(error))
            with self._changed:
                self._sending = False
                self._changed.notify_all()
