"""Work that must not make training wait for Redis: the newest item, retried in the background.

A `NewestOnly` hands what is submitted to `_handle` on a thread of its own;
`submit` returns at once. Only the newest item counts: one submitted while
another waits replaces it. While `_handle` fails with StoreUnavailable, the
item is retried with exponential backoff (a newer one, submitted meanwhile,
is tried instead). With an `outage_limit`, a worker that could handle
nothing for that long stops, with `error` set; so does one whose `_handle`
raises anything else (a write refused by its fence, trainer_svc.pool).
"""

from __future__ import annotations

import threading
import time
from typing import Generic, TypeVar

from shared.checkpoints.backoff import Backoff
from shared.checkpoints.redis_client import StoreUnavailable

T = TypeVar("T")


class NewestOnly(Generic[T]):
    def __init__(
        self, name: str, *, backoff: tuple[float, float] = (0.2, 5.0), outage_limit: float | None = None
    ):
        self._backoff = backoff
        self._outage_limit = outage_limit
        self._pending: T | None = None
        self._busy = False
        self._closing = False
        self.error: Exception | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _handle(self, item: T) -> None:
        """Do the work; raise StoreUnavailable to have it retried."""
        raise NotImplementedError

    def _failed(self, item: T, error: StoreUnavailable, retry_in: float) -> None:
        """Told of each failed attempt."""

    def _gave_up(self, error: StoreUnavailable) -> Exception:
        """The error to stop with once the outage limit is passed."""
        return error

    def submit(self, item: T) -> None:
        """Queue `item`, replacing one not yet handled."""
        with self._changed:
            self._pending = item
            self._changed.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until everything submitted is handled (True) or has failed / timed out (False)."""
        with self._changed:
            done = self._changed.wait_for(
                lambda: self.error or (self._pending is None and not self._busy), timeout
            )
            return bool(done) and self.error is None

    def close(self, timeout: float) -> bool:
        """Handle what is pending (within `timeout`), then stop the thread.

        An item still pending then, or submitted later, is dropped; an item being
        handled is finished (a thread cannot be interrupted), and nothing after it.
        """
        handled = self.flush(timeout)
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._thread.join(timeout=1.0)
        return handled

    def _run(self) -> None:
        outage_since: float | None = None
        backoff = Backoff(*self._backoff)
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._pending is not None or self._closing)
                if self._closing:  # close has waited for what it could: what is left is dropped
                    return
                item = self._pending
                # Woken with nothing pending only when closing, which returned above.
                assert item is not None, "the worker woke with nothing to handle"
                self._pending, self._busy = None, True
            started = time.monotonic()
            try:
                self._handle(item)
            except StoreUnavailable as error:
                outage_since = outage_since or started
                failed = (
                    self._outage_limit is not None and time.monotonic() - outage_since > self._outage_limit
                )
                delay = backoff.next()
                self._failed(item, error, delay)
                with self._changed:
                    self._busy = False
                    if self._pending is None:  # keep only the newest item
                        self._pending = item
                    if failed:
                        self.error = self._gave_up(error)
                        self._changed.notify_all()
                        return
                    # Back off: a newer item waits its turn (it replaces this one). Close cuts
                    # the wait short and ends the thread: close has waited for what it could do.
                    if self._changed.wait_for(lambda: self._closing, timeout=delay):
                        return
                continue
            except Exception as error:  # noqa: BLE001  # not retried (a refused fence, a bug): stop
                with self._changed:
                    self._busy = False
                    self.error = error
                    self._changed.notify_all()
                return
            outage_since = None
            backoff.reset()
            with self._changed:
                self._busy = False
                self._changed.notify_all()
