"""The trainer's start without its Redis: serve at once, wait for Redis in the background, then start.

Everything a trainer works on is in Redis (the queue, the job records, the
checkpoints, the datasets), so until its Redis has answered once it can do
nothing but say so. It still serves from the first moment, as the inference
service does: live ("liveness" SERVING), not ready ("" and the service
NOT_SERVING), every Trainer call refused with UNAVAILABLE and a message
that says why (`check`, which the servicer runs before each call), and a
SIGTERM stops it at once. Once Redis answers a PING, `start_work` starts the
work (the job manager: interrupted jobs are resumed, the pool is joined),
then calls are let through, and `on_ready` says so (health SERVING): a
caller that sees the trainer ready is never refused as waiting.

The first attempt is made by `begin`, in the caller: a trainer whose Redis
is up is ready when its start returns, as before. The retries are on a
thread of their own, with exponential backoff (shared.checkpoints.backoff),
through a client that does not retry by itself: the wait between attempts is
ours alone, and a SIGTERM does not wait for one. The log has one line when
the first attempt fails and one when Redis answers, not one per attempt.

Only reachability is waited for: an address that is not one (REDIS_URL not
a URL, a wrong scheme) fails when the client is made, before any of this.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from shared.checkpoints.backoff import Backoff
from shared.checkpoints.redis_client import StoreUnavailable, describe, unavailable_on_error

log = logging.getLogger("tandem.trainer")
BACKOFF = (0.5, 5.0)  # seconds: the first wait between attempts, and the longest


class WaitingForRedis(StoreUnavailable):
    """A call that came before the trainer first reached its Redis (UNAVAILABLE, as Redis errors are)."""


class RedisWait:
    """Pings `probe` until it answers, then runs `start_work` and `on_ready`, once (unless stopped first)."""

    def __init__(
        self,
        probe: redis.Redis,
        start_work: Callable[[], None],
        on_ready: Callable[[], None],
        *,
        backoff: tuple[float, float] = BACKOFF,
    ):
        self._probe, self._start_work, self._on_ready = probe, start_work, on_ready
        self._backoff = backoff
        self.address = describe(probe)  # without username or password
        # Held while the work starts and by `stop`, so that the work is started once or not at all.
        self._lock = threading.Lock()
        self._reached = False
        self._stopping = threading.Event()
        self._began = 0.0  # monotonic, set by `begin`
        self._unreachable_since: str | None = None  # the clock time of the first failed attempt
        self._last_error = ""
        self._thread = threading.Thread(target=self._retry, name="redis-wait", daemon=True)

    def begin(self) -> None:
        """Try once now; if Redis does not answer, log it and keep trying in the background."""
        self._began = time.monotonic()
        if not self._attempt():
            log.warning(
                "event=redis_unavailable url=%s retrying every %g s to %g s error=%r",
                self.address,
                *self._backoff,
                self._last_error,
            )
            self._thread.start()

    def check(self) -> None:
        """Raise WaitingForRedis until Redis has answered once and the work has started."""
        if not self._reached:
            raise WaitingForRedis(
                f"the trainer is waiting for its Redis at {self.address} (unreachable since "
                f"{self._unreachable_since}: {self._last_error}); retrying"
            )

    def stop(self) -> bool:
        """Stop waiting (at once: an attempt under way is not waited for); True if the work had started."""
        with self._lock:
            self._stopping.set()
            return self._reached

    def _retry(self) -> None:
        backoff = Backoff(*self._backoff)
        while not self._stopping.wait(backoff.next()):
            if self._attempt():
                return

    def _attempt(self) -> bool:
        """One PING; on an answer, start the work. True once it has started (or a stop came first)."""
        try:
            with unavailable_on_error(self._probe):
                self._probe.ping()
        except StoreUnavailable as error:
            self._unreachable_since = self._unreachable_since or time.strftime("%H:%M:%S")
            self._last_error = str(error.__cause__ or error)
            return False
        with self._lock:
            if self._stopping.is_set():
                return True
            self._start_work()
            self._reached = True
        self._on_ready()
        log.info("event=redis_connected url=%s after=%.1fs", self.address, time.monotonic() - self._began)
        return True
