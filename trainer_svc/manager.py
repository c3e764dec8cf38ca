"""The job manager: the queue of jobs and their lifecycle (submit, get, list, cancel, watch).

The queue is in Redis (trainer_svc.pool), shared by every trainer on it:
jobs run on worker threads of their own (at most `max_concurrent_jobs` at
once per trainer; the rest wait QUEUED), each taking the oldest queued job
when it is free, so the gRPC threads stay free. A job is held through a
lease that a thread of the manager's renews; every write for it carries the
lease's fencing token. A submission is checked first (RequestValidator);
each running job is trained by the JobRunner (training.py), and its record
goes to Redis through the job's RecordWriter (record_writer.py) at every
change of state. Unfinished jobs that no trainer holds (their trainer died,
or stopped before) are queued again by the same thread, every scan interval
(docs/trainer-pool.md).
"""

from __future__ import annotations

import builtins
import logging
import threading
import time

from shared.checkpoints.redis_client import StoreUnavailable
from shared.checkpoints.store import FenceRejected
from shared.security.auth import Caller, NotPermitted
from trainer_svc import metrics
from trainer_svc.events import EventHub, JobFinished, JobSnapshot, Subscription
from trainer_svc.job_repository import JobRepository
from trainer_svc.jobs import JobRecord, JobState, JobSubmission, is_job_id
from trainer_svc.pool import JobPool, Taken
from trainer_svc.record_writer import RecordWriter
from trainer_svc.request_validator import RequestValidator
from trainer_svc.training import ActiveJob, JobRunner

log = logging.getLogger("tandem.trainer.jobs")
CANCEL_POLL_SECONDS = 0.25  # how often the owner looks for a cancel asked on another trainer


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
        pool: JobPool,
        *,
        max_concurrent_jobs: int,
        max_restarts: int,
        resume_interrupted: bool,
        outage_limit: float,
        lease_renew_seconds: float = 3.0,
        takeover_scan_seconds: float = 5.0,
        queue_poll_seconds: float = 0.1,
    ):
        self._repository, self._validator, self._runner = repository, validator, runner
        self.events = events
        self.pool = pool
        self._max_restarts, self._resume_interrupted = max_restarts, resume_interrupted
        self._outage_limit = outage_limit
        self._renew_every, self._scan_every = lease_renew_seconds, takeover_scan_seconds
        self._poll_every = queue_poll_seconds
        self._active: dict[str, ActiveJob] = {}
        self._lock = threading.Lock()
        self._accepting = True
        self._stopping = threading.Event()  # the workers take no more jobs
        self._stopped = threading.Event()  # the lease keeper stops
        self._workers = [
            threading.Thread(target=self._work, name=f"job-worker-{i}", daemon=True)
            for i in range(max_concurrent_jobs)
        ]
        self._keeper = threading.Thread(target=self._keep_leases, name="lease-keeper", daemon=True)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the workers and the lease keeper, which first queues the jobs nobody holds."""
        if self._resume_interrupted:
            self._requeue_orphans()
        self._keeper.start()
        for worker in self._workers:
            worker.start()

    def shutdown(self, grace: float) -> None:
        """Take no new jobs; stop running ones at a step boundary with a final checkpoint.

        Each stopped job is saved INTERRUPTED and handed back to the queue at once, its
        lease released, for another trainer of the pool (or this one, restarted) to resume.
        """
        with self._lock:
            self._accepting = False
            self._stopping.set()
            active = list(self._active.values())
        for job in active:
            with job.lock:
                job.stop_as = job.stop_as or JobState.INTERRUPTED
        deadline = time.monotonic() + grace
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
        self._stopped.set()
        self._keeper.join(timeout=max(0.0, deadline - time.monotonic()))

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
            return self._cancel_elsewhere(job_id)
        try:
            return self._cancel_here(job)
        except FenceRejected:
            self._lost(job)
            return self._record(job_id)

    def _cancel_elsewhere(self, job_id: str) -> JobRecord:
        """Cancel a job this trainer does not hold: queued (taken here to end it), or another's."""
        record = self._record(job_id)
        if record.state.finished:
            return record
        taken = self.pool.take(job_id)
        if taken is not None:  # it was queued: it ends here, never started
            job = self._holding(taken)
            if job is None:
                return self._record(job_id)
            try:
                with job.lock:
                    job.stop_as = JobState.CANCELLED
                    self._finish(job, JobState.CANCELLED)
                    return job.record.copy()
            except FenceRejected:
                self._lost(job)
                return self._record(job_id)
        # Held by another trainer (whose TrainingCallback polls this), or by none yet (its
        # taker sees it before training).
        self.pool.request_cancel(job_id)
        if record.state == JobState.RUNNING:
            record.state = JobState.CANCELLING
        return record

    def _cancel_here(self, job: ActiveJob) -> JobRecord:
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

    def _holding(self, taken: Taken) -> ActiveJob | None:
        """The job just taken from the queue, held here under its new token; None if it ended already."""
        record = self._repository.get(taken.job_id)
        if record is None or record.state.finished:  # queued again by a scan as it finished
            if record is not None:
                self.pool.release(record, taken.fence, requeue=False)
            return None
        if taken.taken_over:
            metrics.TAKEN_OVER.inc()
        job = self._active_job(record)
        job.writer.fence = taken.fence
        with self._lock:
            self._active[record.job_id] = job
            metrics.JOBS_OWNED.set(len(self._active))
        return job

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                taken = self.pool.take()
            except StoreUnavailable as error:
                log.warning("event=queue_unavailable error=%r", str(error))
                taken = None
            if taken is None:
                self._stopping.wait(self._poll_every)
                continue
            job = None
            try:
                job = self._holding(taken)
                if job is not None:
                    self._run(job)
            except FenceRejected:
                if job is not None:
                    self._lost(job)
            except StoreUnavailable as error:  # its lease expires; another trainer resumes it
                log.warning("event=job_start_failed job=%s error=%r", taken.job_id, str(error))
                if job is not None:
                    self._drop(job.record.job_id)

    def _run(self, job: ActiveJob) -> None:
        """Train a job just taken, from where its record stands (a resumption if it ran before)."""
        with job.lock:
            record = job.record
            if record.state == JobState.CANCELLING or self._safe_cancel_requested(job):
                job.stop_as = JobState.CANCELLED  # asked while no trainer held it
                self._finish(job, JobState.CANCELLED)
                return
            if record.state != JobState.QUEUED and not self._resume_interrupted:
                self._release(job, requeue=False)  # this trainer resumes nothing
                return
            if record.state in (JobState.RUNNING, JobState.INTERRUPTED):
                record.restarts += 1
                log.info(
                    "event=job_resumable job=%s restarts=%d from_version=%d",
                    record.job_id,
                    record.restarts,
                    record.last_published_version,
                )
            if record.restarts > self._max_restarts:
                record.error = f"gave up after {self._max_restarts} restarts"
                self._finish(job, JobState.FAILED)
                return
            if self._stopping.is_set():  # shutting down before it started: back to the queue
                self._release(job, requeue=True)
                return
            job.record.state = JobState.RUNNING
            job.record.started_at = job.record.started_at or time.time()
            number, copy = job.writer.copy(job.record)
        job.writer.save(number, copy)  # best effort, as every save; FenceRejected: not ours
        self.events.publish(copy.job_id, JobSnapshot(copy))
        final = self._runner.run(job)
        with job.lock:
            self._finish(job, final)

    def _safe_cancel_requested(self, job: ActiveJob) -> bool:
        try:
            return self.pool.cancel_requested(job.record.job_id)
        except StoreUnavailable:
            return False

    # ------------------------------------------------------------ leases

    def _keep_leases(self) -> None:
        """Off the training threads (which never wait for Redis): look for cancels asked on other
        trainers every CANCEL_POLL_SECONDS, renew this trainer's leases every renew interval,
        and queue the jobs nobody holds every scan interval."""
        now = time.monotonic()
        next_renewal, next_scan = now + self._renew_every, now + self._scan_every
        while not self._stopped.wait(min(CANCEL_POLL_SECONDS, self._renew_every)):
            self._poll_cancels()
            if time.monotonic() >= next_renewal:
                next_renewal = time.monotonic() + self._renew_every
                self._renew_leases()
            if self._resume_interrupted and time.monotonic() >= next_scan:
                next_scan = time.monotonic() + self._scan_every
                self._requeue_orphans()

    def _held(self) -> builtins.list[ActiveJob]:  # `list` here is the method
        with self._lock:
            return [job for job in self._active.values() if job.writer.fence is not None]

    def _poll_cancels(self) -> None:
        """A cancel asked on another trainer stops the job here at its next step, as a local one."""
        held = {job.record.job_id: job for job in self._held()}
        try:
            asked = self.pool.cancels_requested(list(held))
        except StoreUnavailable:
            return  # looked for again at the next poll
        for job_id in asked:
            job = held[job_id]
            with job.lock:
                if job.stop_as is not None or job.record.state.finished:
                    continue
                job.stop_as = JobState.CANCELLED
                if job.record.state == JobState.RUNNING:
                    job.record.state = JobState.CANCELLING
                number, record = job.writer.copy(job.record)
            try:  # saved as a local cancel saves it, so that GetJob says CANCELLING on every trainer
                job.writer.save(number, record)
            except FenceRejected:
                self._lost(job)
                continue
            self.events.publish(job_id, JobSnapshot(record))

    def _renew_leases(self) -> None:
        for job in self._held():
            fence = job.writer.fence
            assert fence is not None  # _held has only jobs taken from the pool
            try:
                kept = self.pool.renew(job.record.job_id, fence)
            except StoreUnavailable as error:  # tried again next time; the fence keeps it safe
                log.warning("event=lease_renew_failed job=%s error=%r", job.record.job_id, str(error))
                continue
            if kept:
                metrics.LEASES_RENEWED.inc()
            else:
                job.lost = True  # its TrainingCallback stops it at the next step
                log.warning("event=lease_lost job=%s owner=%s", job.record.job_id, self.pool.owner)

    def _requeue_orphans(self) -> None:
        """Queue the unfinished jobs no trainer holds (their trainer died), for any trainer to resume."""
        try:
            for record in self._repository.unfinished():
                if self.pool.requeue_orphan(record):
                    metrics.ORPHANS_REQUEUED.inc()
                    log.info("event=job_orphan_queued job=%s state=%s", record.job_id, record.state.value)
        except StoreUnavailable as error:
            log.warning("event=orphan_scan_failed error=%r", str(error))

    def _release(self, job: ActiveJob, *, requeue: bool) -> None:
        """Give a held job up (back to the queue if `requeue`) and forget it here."""
        fence = job.writer.fence
        self._drop(job.record.job_id)
        if fence is None:
            return
        try:
            self.pool.release(job.record, fence, requeue=requeue)
        except StoreUnavailable as error:  # the lease expires; the scan queues the job again
            log.warning("event=lease_release_failed job=%s error=%r", job.record.job_id, str(error))

    def _lost(self, job: ActiveJob) -> None:
        """Another trainer took the job over: stop answering for it here, and write nothing more."""
        metrics.LEASES_LOST.inc()
        job.lost = True
        log.warning("event=job_lost job=%s owner=%s", job.record.job_id, self.pool.owner)
        self._drop(job.record.job_id)

    def _drop(self, job_id: str) -> None:
        with self._lock:
            self._active.pop(job_id, None)
            metrics.JOBS_OWNED.set(len(self._active))

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
            self._forget(job)
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
        try:
            if job.writer.save_final(number, record):
                self._forget(job)
        except FenceRejected:
            self._lost(job)

    def _forget(self, job: ActiveJob) -> None:
        """Done with the job here: release its lease; one stopped unfinished goes back to the queue."""
        self._release(job, requeue=not job.record.state.finished)
