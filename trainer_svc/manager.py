"""The job manager: the queue of jobs and their lifecycle (submit, get, list, cancel, watch).

Jobs run on worker threads of their own (at most `max_concurrent_jobs` at
once; the rest wait QUEUED), so the gRPC threads stay free. A submission is
checked first (RequestValidator); each running job is trained by the
JobRunner (training.py), and its record goes to Redis through the job's
RecordWriter (record_writer.py) at every change of state, so a restarted
trainer lists the jobs and, at `start`, resumes the unfinished.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

from shared.security.auth import Caller, NotPermitted
from trainer_svc.events import EventHub, JobFinished, JobSnapshot, Subscription
from trainer_svc.job_repository import JobRepository
from trainer_svc.jobs import JobRecord, JobState, JobSubmission, is_job_id
from trainer_svc.record_writer import RecordWriter
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
    """Queues checked jobs, runs them on `max_concurrent_jobs` workers, and answers for them.

    The settings are TrainerConfig's (trainer_svc.server passes them on):
    `max_restarts` and `resume_interrupted` for the jobs an earlier trainer left
    unfinished, `outage_limit` (publish_outage_seconds) for how long a final
    record is retried while Redis is away.
    """

    def __init__(
        self,
        repository: JobRepository,
        validator: RequestValidator,
        runner: JobRunner,
        events: EventHub,
        *,
        max_concurrent_jobs: int,
        max_restarts: int,
        resume_interrupted: bool,
        outage_limit: float,
    ):
        self._repository, self._validator, self._runner = repository, validator, runner
        self.events = events
        self._max_restarts, self._resume_interrupted = max_restarts, resume_interrupted
        self._outage_limit = outage_limit
        self._queue: queue.Queue[ActiveJob | None] = queue.Queue()
        self._active: dict[str, ActiveJob] = {}
        self._lock = threading.Lock()
        self._accepting = True
        self._workers = [
            threading.Thread(target=self._work, name=f"job-worker-{i}", daemon=True)
            for i in range(max_concurrent_jobs)
        ]

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the workers, first queueing the unfinished jobs of an earlier run."""
        if self._resume_interrupted:
            for record in self._repository.unfinished():
                self._requeue(record)
        for worker in self._workers:
            worker.start()

    def shutdown(self, grace: float) -> None:
        """Take no new jobs; stop running ones at a step boundary with a final checkpoint."""
        with self._lock:
            self._accepting = False
            active = list(self._active.values())
        for job in active:
            with job.lock:
                job.stop_as = job.stop_as or JobState.INTERRUPTED
        for _ in self._workers:
            self._queue.put(None)
        deadline = time.monotonic() + grace
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------ requests

    def submit(self, submission: JobSubmission, caller: Caller) -> JobRecord:
        """Queue a new job of `caller`'s, or return the job an earlier call with the same request_id made."""
        with self._lock:
            if not self._accepting:
                raise NotAccepting("the trainer is shutting down and takes no new jobs")
        record = JobRecord.new(self._validator.check(submission), owner=caller.identity)
        earlier = self._repository.save_new(record, submission.request_id)
        if earlier:
            return self.get(earlier, caller)
        job = self._active_job(record)
        with self._lock:
            self._active[record.job_id] = job
        self._queue.put(job)
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
        with self._lock:
            job = self._active.get(job_id)
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
        with self._lock:
            live = set(self._active)
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
        with self._lock:
            job = self._active.get(job_id)
        if job is None:
            return self._record(job_id)  # finished already
        with job.lock:
            if job.record.state.finished:  # ended meanwhile; its final record is being saved
                return job.record.copy()
            job.stop_as = JobState.CANCELLED
            if job.record.state == JobState.QUEUED:  # never started: ends here
                self._finish(job, JobState.CANCELLED)
                return job.record.copy()
            if job.record.state == JobState.RUNNING:
                job.record.state = JobState.CANCELLING
            number, record = job.writer.copy(job.record)
            # Under the job's lock, like the final save in _finish: this record cannot
            # overwrite the final one, nor its event follow the job's last.
            job.writer.save(number, record)
            self.events.publish(record.job_id, JobSnapshot(record))
        return record

    def watch(self, job_id: str, caller: Caller) -> tuple[JobRecord, Subscription]:
        """The current record of a job `caller` may see, and a subscription to what happens next."""
        subscription = self.events.subscribe(job_id)
        try:
            record = self.get(job_id, caller)
        except (JobNotFound, NotPermitted):
            subscription.close()
            raise
        if record.state.finished:
            self.events.publish(job_id, JobFinished(record))
        return record, subscription

    # ------------------------------------------------------------ running

    def _active_job(self, record: JobRecord) -> ActiveJob:
        writer = RecordWriter(self._repository, record.job_id, outage_limit=self._outage_limit)
        return ActiveJob(record, writer)

    def _requeue(self, record: JobRecord) -> None:
        job = self._active_job(record)
        if record.state == JobState.CANCELLING:  # the trainer stopped while it was cancelling
            self._finish(job, JobState.CANCELLED)
            return
        if record.state in (JobState.RUNNING, JobState.INTERRUPTED):
            record.restarts += 1
        if record.restarts > self._max_restarts:
            record.error = f"gave up after {self._max_restarts} restarts"
            self._finish(job, JobState.FAILED)
            return
        record.state = JobState.QUEUED
        job.writer.save(*job.writer.copy(record))
        with self._lock:
            self._active[record.job_id] = job
        self._queue.put(job)
        log.info(
            "event=job_resumable job=%s restarts=%d from_version=%d",
            record.job_id,
            record.restarts,
            record.last_published_version,
        )

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            with job.lock:
                if job.record.state.finished:
                    continue
                if job.stop_as == JobState.INTERRUPTED:
                    continue  # shutting down before it started: stays QUEUED for the next trainer
                job.record.state = JobState.RUNNING
                job.record.started_at = job.record.started_at or time.time()
                number, record = job.writer.copy(job.record)
            job.writer.save(number, record)
            self.events.publish(record.job_id, JobSnapshot(record))
            final = self._runner.run(job)
            with job.lock:
                self._finish(job, final)

    def _finish(self, job: ActiveJob, state: JobState) -> None:
        """Record the final state (caller holds job.lock) and tell the watchers.

        A final record that Redis does not take now is saved again by a thread of its
        own until it does (within the outage limit); the job stays in `_active` till
        then, so that GetJob answers from it and not from the stale record in Redis.
        """
        job.record.state = state
        if state.finished:
            job.record.finished_at = time.time()
        number, record = job.writer.copy(job.record)
        if job.writer.save(number, record) or not state.finished:
            self._forget(record.job_id)
        else:
            threading.Thread(
                target=self._save_final, args=(job, number, record), daemon=True, name=f"save-{record.job_id}"
            ).start()
        event = JobFinished(record) if state.finished else JobSnapshot(record)
        self.events.publish(record.job_id, event)
        log.info(
            "event=job_%s job=%s model=%s version=%d error=%r",
            state.value.lower(),
            record.job_id,
            record.model_name,
            record.last_published_version,
            record.error,
        )

    def _save_final(self, job: ActiveJob, number: int, record: JobRecord) -> None:
        """Retry the final record (RecordWriter.save_final) and forget the job once it is saved.

        One that is not saved in time keeps the job in `_active`: this trainer still answers for it.
        """
        if job.writer.save_final(number, record):
            self._forget(record.job_id)

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._active.pop(job_id, None)
