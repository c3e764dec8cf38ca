"""What one job writes to Redis while this trainer holds it: its record's numbered copies,
its final record, and the optimiser state that goes with each of its checkpoints.

A job's record is saved at every change of state, epoch and checkpoint, from
several threads (the training loop, the checkpoint publisher, a cancel), so
a restarted trainer lists it and resumes it if it is unfinished. Each copy
of the record is numbered when it is taken (under the job's lock) and a
copy older than the one already in Redis is never written over it
(`RecordWriter.write`). A save that Redis refuses is not fatal: the next one
catches up; a final record, which has no next save, is retried with backoff
(`RecordWriter.save_final`). An epoch's record goes through a `RecordSaver`,
a thread of the job's own, so that the training thread never waits for Redis.

With each checkpoint goes the optimiser's state (job_repository.py), so that
a job resuming from its own checkpoint resumes its optimiser too.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from shared.checkpoints.backoff import Backoff
from shared.checkpoints.redis_client import StoreUnavailable
from shared.checkpoints.store import Fence
from shared.nn.optim import Optimizer
from shared.nn.run import Hyperparameters, prepare_optimizer
from trainer_svc.background import NewestOnly
from trainer_svc.job_repository import JobRepository
from trainer_svc.jobs import JobRecord

log = logging.getLogger("tandem.trainer.jobs")


class RecordWriter:
    """Saves one job's record (numbered copies, the final one) and optimiser states to Redis."""

    def __init__(self, repository: JobRepository, job_id: str, *, outage_limit: float):
        self._repository, self.job_id = repository, job_id
        self._outage_limit = outage_limit  # how long a final record is retried
        # Copies of the record are saved from several threads (training loop, publisher,
        # cancel); each copy is numbered under the job's lock and a copy older than the one
        # already in Redis is never written over it (see `write`).
        self.copies = 0
        self.saved_copy = 0
        self._save_lock = threading.Lock()
        # The owner's fencing token once the job is taken from the pool (trainer_svc.pool): every
        # write is refused (FenceRejected) once another trainer has taken the job over.
        self.fence: Fence | None = None

    def copy(self, record: JobRecord) -> tuple[int, JobRecord]:
        """A numbered copy of the job's live `record`; the caller holds the job's lock."""
        self.copies += 1
        return self.copies, record.copy()

    def save(self, number: int, record: JobRecord) -> bool:
        """Best effort (`write`): a Redis outage must not stop training; the next save catches up."""
        try:
            self.write(number, record)
            return True
        except StoreUnavailable as error:
            log.warning("event=job_save_failed job=%s error=%r", record.job_id, str(error))
            return False

    def write(self, number: int, record: JobRecord) -> None:
        """Save a numbered copy of the job's record unless a later copy is in Redis already.

        Copies are taken under the job's lock but saved outside it, from several threads;
        without this, a copy taken before a checkpoint was published (an epoch's end on
        the training thread) could land after the copy that records that checkpoint, and a
        trainer that died then would resume from the checkpoint before.
        Raises StoreUnavailable.
        """
        with self._save_lock:
            if number > self.saved_copy:
                self._repository.save(record, self.fence)
                self.saved_copy = number

    def save_final(self, number: int, record: JobRecord, backoff: tuple[float, float] = (0.2, 5.0)) -> bool:
        """Save a job's final record, retrying with backoff; there is no next save to catch up.

        False if Redis did not take it within the outage limit (logged).
        """
        deadline = time.monotonic() + self._outage_limit
        delays = Backoff(*backoff)
        while not self.save(number, record):
            delay = delays.next()
            if time.monotonic() + delay > deadline:
                log.error("event=job_record_not_saved job=%s state=%s", record.job_id, record.state.value)
                return False
            time.sleep(delay)
        return True

    def save_optimizer_state(
        self, version: int, step: int, state: dict[str, np.ndarray], keep: tuple[int, int]
    ) -> None:
        """Best effort, before the record names `version`: the state of checkpoint `keep` stays."""
        try:
            self._repository.save_optimizer_state(
                self.job_id, version, step, state, keep=keep, fence=self.fence
            )
        except StoreUnavailable as error:
            log.warning(
                "event=optimizer_state_save_failed job=%s version=%d error=%r",
                self.job_id,
                version,
                str(error),
            )

    def resumed_optimizer(self, model, hp: Hyperparameters, version: int, step: int) -> Optimizer:
        """The optimiser saved with the job's own checkpoint `version` (at `step`).

        A state that is missing (Redis lost it) is logged as `optimizer_state_missing`;
        one that is unreadable or unusable (it does not fit the model, or holds another
        form, such as the velocity momentum of an older trainer) as
        `optimizer_state_unusable`, with the reason. Either way training resumes with
        a fresh optimiser.
        """
        try:
            state = self._repository.optimizer_state(self.job_id, version, step)
            if state is not None:
                return prepare_optimizer(model, hp, state)
            event, reason = "optimizer_state_missing", "none stored for this checkpoint"
        except ValueError as error:
            event, reason = "optimizer_state_unusable", str(error)
        log.warning("event=%s job=%s version=%d step=%d reason=%r", event, self.job_id, version, step, reason)
        return prepare_optimizer(model, hp)


class RecordSaver(NewestOnly[tuple[int, JobRecord]]):
    """Saves the numbered record copies a job's training loop hands over, off its thread.

    Only the newest copy waits (an older one is superseded, never written after
    it); while Redis is away it is retried with backoff until it is saved,
    superseded, or the saver closed. `RecordWriter.write` keeps it from landing
    over a newer copy that another thread saved meanwhile.
    """

    def __init__(self, writer: RecordWriter):
        self._writer = writer
        super().__init__(f"record-saver-{writer.job_id}")

    def _handle(self, item: tuple[int, JobRecord]) -> None:
        self._writer.write(*item)

    def _failed(self, item: tuple[int, JobRecord], error: StoreUnavailable, retry_in: float) -> None:
        log.warning(
            "event=job_save_failed job=%s error=%r retry_in=%.1fs", self._writer.job_id, str(error), retry_in
        )
