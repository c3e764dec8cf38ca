"""The job manager: what the trainer answers for jobs (submit, get, list, cancel, watch), and its lifecycle.

The queue is in Redis (trainer_svc.pool), shared by every trainer on it, so
a request may be about a job another trainer runs. A submission is checked
(RequestValidator), saved, and queued; the job workers (job_workers.py)
take queued jobs and train them; the jobs this trainer holds are HeldJobs'
(held_jobs.py), whose leases the LeaseKeeper (lease_keeper.py) keeps. A
cancel reaches a job wherever it is: ended here if queued, stopped here if
held here, asked through Redis if another trainer holds it
(docs/trainer-pool.md).
"""

from __future__ import annotations

import logging
import time

from shared.checkpoints.store import FenceRejected
from shared.security.auth import Caller, NotPermitted
from trainer_svc.event_log import JobEventLog, StreamSubscription
from trainer_svc.events import EventHub, JobFinished, JobSnapshot, Subscription
from trainer_svc.held_jobs import HeldJobs
from trainer_svc.job_repository import JobRepository
from trainer_svc.job_workers import JobWorkers
from trainer_svc.jobs import JobRecord, JobState, JobSubmission, is_job_id
from trainer_svc.lease_keeper import LeaseKeeper
from trainer_svc.pool import JobPool
from trainer_svc.request_validator import RequestValidator
from trainer_svc.training import ActiveJob, JobRunner

log = logging.getLogger("tandem.trainer.jobs")


class JobNotFound(LookupError):
    pass


class NotAccepting(RuntimeError):
    """The trainer is shutting down and takes no new jobs."""


def _allow(allowed: bool, job_id: str, why: str) -> None:
    """Refuse a caller another's job (NotPermitted: PERMISSION_DENIED), saying who may."""
    if not allowed:
        raise NotPermitted(f"job_id {job_id!r} is another caller's job; {why}")


class JobManager:
    """Answers for the pool's jobs, and starts and stops this trainer's workers and lease keeper.

    The settings are TrainerConfig's (trainer_svc.server passes them on):
    `max_restarts` and `resume_interrupted` for the jobs a trainer left
    unfinished, `outage_limit` (publish_outage_seconds) for how long a final
    record is retried while Redis is away, and the pool's timing.
    """

    def __init__(
        self,
        repository: JobRepository,
        validator: RequestValidator,
        runner: JobRunner,
        events: EventHub,
        pool: JobPool,
        event_log: JobEventLog,
        *,
        max_concurrent_jobs: int,
        max_restarts: int,
        resume_interrupted: bool,
        outage_limit: float,
        lease_renew_seconds: float = 3.0,
        takeover_scan_seconds: float = 5.0,
        queue_poll_seconds: float = 0.1,
    ):
        self._repository, self._validator = repository, validator
        self.events, self.pool, self._event_log = events, pool, event_log
        self.held = HeldJobs(repository, pool, events, outage_limit=outage_limit)
        self._workers = JobWorkers(
            pool,
            self.held,
            runner,
            events,
            count=max_concurrent_jobs,
            max_restarts=max_restarts,
            resume_interrupted=resume_interrupted,
            poll_seconds=queue_poll_seconds,
        )
        self._keeper = LeaseKeeper(
            pool,
            repository,
            self.held,
            self._cancel_here,
            renew_seconds=lease_renew_seconds,
            scan_seconds=takeover_scan_seconds,
            requeue_orphans=resume_interrupted,
        )

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._keeper.start()
        self._workers.start()

    def shutdown(self, grace: float) -> None:
        """Take no new jobs; stop running ones at a step boundary with a final checkpoint.

        Each stopped job is saved INTERRUPTED and handed back to the queue at once, its
        lease released, for another trainer of the pool (or this one, restarted) to resume.
        """
        self._workers.stopping.set()
        for job in self.held.all():
            with job.lock:
                job.stop_as = job.stop_as or JobState.INTERRUPTED
        deadline = time.monotonic() + grace
        self._workers.stop(deadline)
        self._keeper.stop(timeout=max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------ requests

    def submit(self, submission: JobSubmission, caller: Caller) -> JobRecord:
        """Queue a new job of `caller`'s, or return the job an earlier call with the same request_id made."""
        if self._workers.stopping.is_set():
            raise NotAccepting("the trainer is shutting down and takes no new jobs")
        record = JobRecord.new(self._validator.check(submission), owner=caller.identity)
        earlier = self._repository.save_new(record, submission.request_id)
        if earlier:
            return self.get(earlier, caller)
        # Saved, then queued: a trainer that dies in between leaves a QUEUED record that no
        # one holds, which the next scan (any trainer's) queues.
        self.pool.enqueue(record)
        log.info(
            "event=job_queued job=%s model=%s dataset=%s",
            record.job_id,
            record.model_name,
            record.request.dataset,
        )
        return record.copy()

    def get(self, job_id: str, caller: Caller) -> JobRecord:
        """A job `caller` may see: its own, or anyone's with the view role (Caller.sees)."""
        record = self._record(job_id)
        _allow(caller.sees(record.owner), job_id, "the train role sees its own jobs only (view: all)")
        return record

    def _record(self, job_id: str) -> JobRecord:
        # An id is checked before it becomes part of a Redis key: "ID:optimizer" is another key.
        if not is_job_id(job_id):
            raise JobNotFound(f"job_id {job_id[:40]!r}: no such job (job ids are 16 hex digits)")
        job = self.held.get(job_id)
        if job:
            with job.lock:
                return job.record.copy()
        record = self._repository.get(job_id)
        if record is None:
            raise JobNotFound(f"job_id {job_id!r}: no such job")
        return record

    def list(
        self, caller: Caller, state: JobState | None = None, limit: int | None = None, offset: int = 0
    ) -> list[JobRecord]:
        """The jobs `caller` may see (Caller.sees)."""
        records = [r for r in self._repository.list() if caller.sees(r.owner)]
        live = self.held.ids()
        records = [self._record(r.job_id) if r.job_id in live else r for r in records]
        if state:
            records = [r for r in records if r.state == state]
        return records[offset : None if limit is None else offset + limit]

    def cancel(self, job_id: str, caller: Caller) -> JobRecord:
        """Cancel a job `caller` controls: its own, or anyone's as admin (Caller.controls)."""
        _allow(
            caller.controls(self._record(job_id).owner),
            job_id,
            "a caller cancels its own jobs only (admin: anyone's)",
        )
        job = self.held.get(job_id)
        return self._cancel_here(job) if job else self._cancel_elsewhere(job_id)

    def _cancel_elsewhere(self, job_id: str) -> JobRecord:
        """Cancel a job this trainer does not hold: queued (taken here to end it), or another's."""
        record = self._record(job_id)
        if record.state.finished:
            return record
        taken = self.pool.take(job_id)
        if taken is not None:  # it was queued: it ends here, never started
            job = self.held.hold(taken)
            return self._cancel_here(job) if job else self._record(job_id)
        # Held by another trainer (whose lease keeper looks for this), or by none yet (taken from
        # the queue a moment ago, or never queued: its taker sees the request before training).
        self.pool.request_cancel(job_id)
        if record.state in (JobState.QUEUED, JobState.RUNNING):
            record.state = JobState.CANCELLING  # asked, not yet done: as a local cancel answers
        return record

    def _cancel_here(self, job: ActiveJob) -> JobRecord:
        """Stop a job held here: at once if it has not started, else at its next step.

        Also the lease keeper's answer to a cancel asked on another trainer, so that GetJob
        says CANCELLING on every trainer.
        """
        try:
            with job.lock:
                if job.record.state.finished:  # ended meanwhile; its final record is being saved
                    return job.record.copy()
                job.stop_as = JobState.CANCELLED
                if job.record.state == JobState.QUEUED:  # never started: ends here
                    self.held.finish(job, JobState.CANCELLED)
                    return job.record.copy()
                if job.record.state == JobState.RUNNING:
                    job.record.state = JobState.CANCELLING
                number, record = job.writer.copy(job.record)
                # Under the job's lock, like the final save in HeldJobs.finish: this record
                # cannot overwrite the final one, nor its event follow the job's last.
                job.writer.save(number, record)
                self.events.publish(record.job_id, JobSnapshot(record))
            return record
        except FenceRejected:  # another trainer took it over meanwhile: it answers for it now
            self.held.lost(job)
            return self._record(job.record.job_id)

    def watch(self, job_id: str, caller: Caller) -> tuple[JobRecord, Subscription | StreamSubscription]:
        """The current record of a job `caller` may see, and a subscription to what happens next.

        Either subscription starts before the record is read, so that an event in between is
        heard (again), never missed: a job held here is followed here; one held by another
        trainer (or queued) through its Redis stream, from the entry before the record.
        """
        if is_job_id(job_id) and self.held.get(job_id) is None:
            after = self._event_log.last_id(job_id)  # the id is checked: it becomes part of a key
            record = self.get(job_id, caller)
            if record.state.finished:
                return record, self._finished(record)
            return record, StreamSubscription(
                self._event_log, job_id, after, self.events.count_follower(job_id)
            )
        subscription = self.events.subscribe(job_id)
        try:
            record = self.get(job_id, caller)  # JobNotFound for an id that is not one
        except (JobNotFound, NotPermitted):
            subscription.close()
            raise
        if record.state.finished:  # ended as the watch began
            subscription.push(JobFinished(record))
        return record, subscription

    def _finished(self, record: JobRecord) -> Subscription:
        """A subscription that has only the job's end to tell."""
        subscription = self.events.subscribe(record.job_id)
        subscription.push(JobFinished(record))
        return subscription
