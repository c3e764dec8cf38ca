"""The jobs this trainer holds, from the moment it takes one from the pool's queue to the moment it lets go.

A job is held under a lease of the pool's (trainer_svc.pool) and its fencing
token, which its RecordWriter puts on every write. It is let go in one of
three ways, each here: it ends (`finish`: the final record, then the lease
released), this trainer gives it back (`release`, e.g. at shutdown: queued
again for any trainer), or another trainer has taken it over (`lost`:
nothing more is written for it here). While a job is held, GetJob on this
trainer answers from its live record rather than from Redis.
"""

from __future__ import annotations

import logging
import threading
import time

from shared.checkpoints.redis_client import StoreUnavailable
from shared.checkpoints.store import FenceRejected
from trainer_svc import metrics
from trainer_svc.events import EventHub, JobFinished, JobMoved, JobSnapshot
from trainer_svc.job_repository import JobRepository
from trainer_svc.jobs import JobRecord, JobState
from trainer_svc.pool import JobPool, Taken
from trainer_svc.record_writer import RecordWriter
from trainer_svc.training import ActiveJob

log = logging.getLogger("tandem.trainer.jobs")


class HeldJobs:
    """The jobs held here by id, and the ways of letting one go (see the module docstring)."""

    def __init__(self, repository: JobRepository, pool: JobPool, events: EventHub, *, outage_limit: float):
        self._repository, self._pool, self._events = repository, pool, events
        self._outage_limit = outage_limit  # how long a final record is retried while Redis is away
        self._jobs: dict[str, ActiveJob] = {}
        self._lock = threading.Lock()

    def get(self, job_id: str) -> ActiveJob | None:
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[ActiveJob]:
        with self._lock:
            return list(self._jobs.values())

    def ids(self) -> set[str]:
        with self._lock:
            return set(self._jobs)

    def hold(self, taken: Taken) -> ActiveJob | None:
        """The job just taken from the queue, held here under its new token; None if it ended already."""
        record = self._repository.get(taken.job_id)
        if record is None or record.state.finished:  # queued again by a scan as it finished
            if record is not None:
                self._pool.release(record, taken.fence, requeue=False)
            return None
        if taken.taken_over:
            metrics.TAKEN_OVER.inc()
        record.trainer = self._pool.owner  # saved with the record's next change
        writer = RecordWriter(self._repository, record.job_id, outage_limit=self._outage_limit)
        writer.fence = taken.fence
        job = ActiveJob(record, writer)
        with self._lock:
            self._jobs[record.job_id] = job
            metrics.JOBS_OWNED.set(len(self._jobs))
        return job

    def finish(self, job: ActiveJob, state: JobState) -> None:
        """Record the job's final state (the caller holds job.lock), tell the watchers, let it go.

        A final record that Redis does not take now is saved again by a thread of its own
        until it does (within the outage limit); the job stays held till then, so that
        GetJob answers from it and not from the stale record in Redis. `state` may also be
        INTERRUPTED (a stop at shutdown): the job goes back to the queue.
        """
        job.record.state = state
        if state.finished:
            job.record.finished_at = time.time()
        number, record = job.writer.copy(job.record)
        if job.writer.save(number, record) or not state.finished:
            self._let_go(job)
        else:
            threading.Thread(
                target=self._save_final, args=(job, number, record), daemon=True, name=f"save-{record.job_id}"
            ).start()
        self._events.publish(record.job_id, JobFinished(record) if state.finished else JobSnapshot(record))
        log.info(
            "event=job_%s job=%s model=%s version=%d error=%r",
            state.value.lower(),
            record.job_id,
            record.model_name,
            record.last_published_version,
            record.error,
        )

    def _save_final(self, job: ActiveJob, number: int, record: JobRecord) -> None:
        """Retry the final record (RecordWriter.save_final); let the job go once it is saved.

        One that is not saved in time stays held: this trainer still answers for it.
        """
        try:
            if job.writer.save_final(number, record):
                self._let_go(job)
        except FenceRejected:
            self.lost(job)

    def _let_go(self, job: ActiveJob) -> None:
        """Done with the job here: its lease released; one stopped unfinished goes back to the queue."""
        self.release(job, requeue=not job.record.state.finished)

    def release(self, job: ActiveJob, *, requeue: bool) -> None:
        """Give a held job up (back to the queue if `requeue`) and forget it here."""
        fence = job.writer.fence
        assert fence is not None  # set by `hold`: every held job was taken from the pool
        self.forget(job)
        try:
            self._pool.release(job.record, fence, requeue=requeue)
        except StoreUnavailable as error:  # the lease expires; an orphan scan queues the job again
            log.warning("event=lease_release_failed job=%s error=%r", job.record.job_id, str(error))

    def lost(self, job: ActiveJob) -> None:
        """Another trainer took the job over: stop answering for it here, and write nothing more."""
        with job.lock:  # found by the lease keeper, then by the training thread's refused write: once
            if job.lost:
                return
            job.lost = True  # its TrainingCallback stops it at the next step
        metrics.LEASES_LOST.inc()
        log.warning("event=job_lost job=%s owner=%s", job.record.job_id, self._pool.owner)
        self.forget(job)
        self._events.tell_watchers(job.record.job_id, JobMoved())

    def forget(self, job: ActiveJob) -> None:
        """Stop holding the job here, its lease untouched (one that could not start expires)."""
        with self._lock:
            self._jobs.pop(job.record.job_id, None)
            metrics.JOBS_OWNED.set(len(self._jobs))
