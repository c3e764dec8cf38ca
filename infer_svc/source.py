"""The version source (TF Serving's source): tells the registry which versions exist.

Two paths, because Pub/Sub alone loses messages:
- Pub/Sub announcements, for reloads within milliseconds of a publish;
- a poll of each followed model's `latest` every `poll_interval` seconds, and
  at once after every (re)connection, so an announcement missed while
  disconnected is caught up on.
While Redis is down the source retries with backoff; the registry keeps
serving what it has.
"""

from __future__ import annotations

import logging
import threading

from infer_svc.registry import Registry
from shared.checkpoints.backoff import Backoff
from shared.checkpoints.redis_client import StoreUnavailable
from shared.checkpoints.store import CheckpointStore, parse_announcement

log = logging.getLogger("tandem.infer.source")


class VersionSource:
    def __init__(
        self,
        store: CheckpointStore,
        registry: Registry,
        *,
        poll_interval: float = 2.0,
        backoff: tuple[float, float] = (0.1, 5.0),
    ):
        self.store, self.registry = store, registry
        self.poll_interval = poll_interval
        self.backoff = backoff
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="version-source", daemon=True)

    def start(self) -> VersionSource:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    def poll(self) -> None:
        """Offer the latest version of every model the registry follows."""
        for name in self.registry.model_names():
            version = self.store.latest_version(name)
            if version is not None:
                self.registry.offer(name, version)

    def _run(self) -> None:
        backoff = Backoff(*self.backoff)
        while not self._stopping.is_set():
            try:
                self._listen(on_connected=backoff.reset)
                return
            except StoreUnavailable as error:
                delay = backoff.next()
                log.warning("event=source_disconnected error=%r retry_in=%.1fs", str(error), delay)
                self._stopping.wait(delay)

    def _listen(self, on_connected) -> None:
        """Follow announcements until stopped, polling between them; raise StoreUnavailable on loss."""
        subscription = self.store.subscribe()
        try:
            self.poll()  # catch up on whatever was announced while we were away
            on_connected()
            log.info("event=source_connected")
            while not self._stopping.is_set():
                try:
                    message = subscription.get_message(timeout=self.poll_interval)
                except Exception as error:  # redis-py raises several kinds on a lost link
                    raise StoreUnavailable(f"announcements subscription lost: {error}") from error
                try:
                    announcement = parse_announcement(message)
                except ValueError as error:  # not ours to act on; the poll still catches up
                    log.warning("event=bad_announcement error=%r", str(error))
                    continue
                if announcement:
                    self.registry.offer(announcement.model_name, announcement.version)
                else:
                    self.poll()
        finally:
            subscription.close()
