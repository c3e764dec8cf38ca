"""Publishing a job's checkpoints without making training wait for Redis.

`submit` takes a `snapshot` of the weights (and of the optimiser's state,
which goes to `on_published` for the trainer's own use, never into the
checkpoint) and returns at once; a thread of the publisher's own encodes and
publishes. While Redis is unreachable only the newest snapshot is kept, retried with
exponential backoff; if nothing could be published for `outage_limit`
seconds the publisher fails, and the job with it, with an error that says so.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shared.checkpoints.checkpoint import CheckpointMeta
from shared.checkpoints.redis_client import StoreUnavailable
from shared.checkpoints.store import CheckpointStore, Fence
from shared.nn import Model, build_model
from trainer_svc.background import NewestOnly

log = logging.getLogger("tandem.trainer.publisher")


class PublishFailed(RuntimeError):
    """No checkpoint could be published for longer than the outage limit."""


@dataclass(frozen=True)
class Snapshot:
    model: Model
    meta: CheckpointMeta
    optimizer_state: dict[str, np.ndarray]


def snapshot(model: Model, meta: CheckpointMeta, optimizer_state: dict[str, np.ndarray]) -> Snapshot:
    """A copy of the weights and optimiser state as they are now, safe from the training that goes on."""
    # state_dict() is a copy already: the new model can take its arrays as they are.
    copy = build_model(model.spec, dtype=model.dtype).load_state_dict(model.state_dict(), copy=False)
    return Snapshot(copy, meta, {name: np.array(array) for name, array in optimizer_state.items()})


class CheckpointPublisher(NewestOnly[Snapshot]):
    def __init__(
        self,
        store: CheckpointStore,
        on_published: Callable[[int, Snapshot, float], None],
        *,
        outage_limit: float = 60.0,
        backoff: tuple[float, float] = (0.2, 5.0),
        on_failure: Callable[[], None] = lambda: None,
        fence: Fence | None = None,
        last_version: int = 0,
    ):
        self._store = store
        self._fence = fence  # the job owner's fencing token (trainer_svc.pool), if it has one
        # The job's latest version: each publish is numbered above it, even by a Redis that
        # lost it (CheckpointStore.publish's `after`), so the job's versions only go up.
        self._last_version = last_version
        self._on_published = on_published  # (version, snapshot, seconds it took); must not raise
        self._on_failure = on_failure  # each failed attempt, for metrics
        super().__init__("checkpoint-publisher", backoff=backoff, outage_limit=outage_limit)

    def _handle(self, item: Snapshot) -> None:
        started = time.monotonic()
        version = self._store.publish(item.model, item.meta, self._fence, after=self._last_version)
        self._last_version = version
        self._on_published(version, item, time.monotonic() - started)

    def _failed(self, item: Snapshot, error: StoreUnavailable, retry_in: float) -> None:
        self._on_failure()
        log.warning(
            "event=publish_failed model=%s step=%d error=%r retry_in=%.1fs",
            item.meta.model_name,
            item.meta.step,
            str(error),
            retry_in,
        )

    def _gave_up(self, error: StoreUnavailable) -> PublishFailed:
        return PublishFailed(f"no checkpoint could be published for {self._outage_limit:.0f} s: {error}")
