"""The job workers: `max_concurrent_jobs` threads per trainer, each taking the oldest queued job.

The queue is the pool's, in Redis (trainer_svc.pool), shared by every
trainer on it, so a job started on one trainer may run on another. A worker
holds the job it takes (HeldJobs), decides whether to train it at all (a
cancel asked while it waited, too many restarts, a trainer that resumes
nothing, a shutdown), marks it RUNNING, has the JobRunner train it, and
records how it ended. The gRPC threads never train.
"""

from __future__ import annotations

import logging
import threading
import time

from shared.checkpoints.redis_client import StoreUnavailable
from shared.checkpoints.store import FenceRejected
from trainer_svc.events import EventHub, JobSnapshot
from trainer_svc.held_jobs import HeldJobs
from trainer_svc.jobs import JobState
from trainer_svc.pool import JobPool
from trainer_svc.training import ActiveJob, JobRunner

log = logging.getLogger("tandem.trainer.jobs")


class JobWorkers:
    def __init__(
        self,
        pool: JobPool,
        held: HeldJobs,
        runner: JobRunner,
        events: EventHub,
        *,
        count: int,
        max_restarts: int,
        resume_interrupted: bool,
        poll_seconds: float,
    ):
        self._pool, self._held, self._runner, self._events = pool, held, runner, events
        self._max_restarts, self._resume_interrupted = max_restarts, resume_interrupted
        self._poll_every = poll_seconds  # how often an idle worker looks at the queue
        self.stopping = threading.Event()  # set: the workers take no more jobs
        self._threads = [
            threading.Thread(target=self._work, name=f"job-worker-{i}", daemon=True) for i in range(count)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, deadline: float) -> None:
        """Take no more jobs, and wait till `deadline` (monotonic) for the running ones to end."""
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        while not self.stopping.is_set():
            try:
                taken = self._pool.take()
            except StoreUnavailable as error:
                log.warning("event=queue_unavailable error=%r", str(error))
                taken = None
            if taken is None:
                self.stopping.wait(self._poll_every)
                continue
            job = None
            try:
                job = self._held.hold(taken)
                if job is not None:
                    self._run(job)
            except FenceRejected:
                if job is not None:
                    self._held.lost(job)
            except StoreUnavailable as error:  # its lease expires; another trainer resumes it
                log.warning("event=job_start_failed job=%s error=%r", taken.job_id, str(error))
                if job is not None:
                    self._held.forget(job)

    def _run(self, job: ActiveJob) -> None:
        """Train a job just taken, from where its record stands (a resumption if it ran before)."""
        with job.lock:
            record = job.record
            if record.state.finished:  # cancelled here as it was taken (JobManager.cancel)
                return
            if record.state == JobState.CANCELLING or self._cancel_requested(job):
                job.stop_as = JobState.CANCELLED  # asked while no trainer held it
                self._held.finish(job, JobState.CANCELLED)
                return
            if record.state != JobState.QUEUED and not self._resume_interrupted:
                self._held.release(job, requeue=False)  # this trainer resumes nothing
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
                self._held.finish(job, JobState.FAILED)
                return
            if self.stopping.is_set():  # shutting down before it started: back to the queue
                self._held.release(job, requeue=True)
                return
            record.state = JobState.RUNNING
            record.started_at = record.started_at or time.time()
            number, copy = job.writer.copy(record)
        job.writer.save(number, copy)  # best effort, as every save; FenceRejected: not ours
        self._events.publish(copy.job_id, JobSnapshot(copy))
        final = self._runner.run(job)
        with job.lock:
            self._held.finish(job, final)

    def _cancel_requested(self, job: ActiveJob) -> bool:
        try:
            return self._pool.cancel_requested(job.record.job_id)
        except StoreUnavailable:
            return False
