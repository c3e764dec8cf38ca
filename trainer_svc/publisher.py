"""Publishing a job's checkpoints without making training wait for Redis.

`submit` snapshots the weights and returns at once; a thread of the
publisher's own encodes and publishes. While Redis is unreachable only the
newest snapshot is kept, retried with exponential backoff; if nothing could
be published for `outage_limit` seconds the publisher fails, and the job
with it, with an error that says so.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from shared.checkpoint import CheckpointMeta
from shared.nn import Model, build_model
from shared.redis_client import StoreUnavailable
from shared.store import CheckpointStore

log = logging.getLogger("tandem.trainer.publisher")


class PublishFailed(RuntimeError):
    """No checkpoint could be published for longer than the outage limit."""


@dataclass(frozen=True)
class Snapshot:
    model: Model
    meta: CheckpointMeta


def snapshot(model: Model, meta: CheckpointMeta) -> Snapshot:
    """A copy of the weights as they are now, safe from the training that goes on."""
    copy = build_model(model.spec, dtype=model.dtype).load_state_dict(model.state_dict())
    return Snapshot(copy, meta)


class CheckpointPublisher:
    def __init__(self, store: CheckpointStore, on_published: Callable[[int, CheckpointMeta, float], None],
                 *, outage_limit: float = 60.0, backoff: tuple[float, float] = (0.2, 5.0),
                 on_failure: Callable[[], None] = lambda: None):
        self._store = store
        self._on_published = on_published   # (version, meta, seconds it took)
        self._on_failure = on_failure       # each failed attempt, for metrics
        self._outage_limit = outage_limit
        self._backoff = backoff
        self._pending: Snapshot | None = None
        self._busy = False
        self._closing = False
        self.error: PublishFailed | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="checkpoint-publisher", daemon=True)
        self._thread.start()

    def submit(self, model: Model, meta: CheckpointMeta) -> None:
        """Queue a snapshot for publishing, replacing one not yet published."""
        item = snapshot(model, meta)
        with self._changed:
            self._pending = item
            self._changed.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted is published (True) or has failed / timed out (False)."""
        with self._changed:
            done = self._changed.wait_for(
                lambda: self.error or (self._pending is None and not self._busy), timeout)
            return bool(done) and self.error is None

    def close(self, timeout: float) -> bool:
        """Publish what is pending (within `timeout`), then stop the thread."""
        published = self.flush(timeout)
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join(timeout=1.0)
        return published

    def _run(self) -> None:
        outage_since: float | None = None
        delay = self._backoff[0]
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending is not None or self._closing)
                if self._pending is None:
                    return
                item, self._pending, self._busy = self._pending, None, True
            started = time.monotonic()
            try:
                version = self._store.publish(item.model, item.meta)
            except StoreUnavailable as error:
                self._on_failure()
                outage_since = outage_since or started
                failed = time.monotonic() - outage_since > self._outage_limit
                log.warning("event=publish_failed model=%s step=%d error=%r retry_in=%.1fs",
                            item.meta.model_name, item.meta.step, str(error), delay)
                with self._changed:
                    self._busy = False
                    if self._pending is None:   # keep only the newest snapshot
                        self._pending = item
                    if failed:
                        self.error = PublishFailed(
                            f"no checkpoint could be published for {self._outage_limit:.0f} s: {error}")
                        self._changed.notify_all()
                        return
                    # Back off: a newer snapshot waits its turn (it replaces this one). Close cuts
                    # the wait short and ends the thread: close has waited for what it could publish.
                    if self._changed.wait_for(lambda: self._closing, timeout=delay):
                        return
                delay = min(delay * 2, self._backoff[1])
                continue
            outage_since, delay = None, self._backoff[0]
            self._on_published(version, item.meta, time.monotonic() - started)
            with self._changed:
                self._busy = False
                self._changed.notify_all()
