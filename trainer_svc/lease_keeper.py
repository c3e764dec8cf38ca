"""The lease keeper: one thread per trainer that keeps its jobs held, and the pool's orphans taken care of.

Off the training threads, which never wait for Redis (docs/trainer-pool.md):
- every CANCEL_POLL_SECONDS it looks for cancels asked on other trainers for
  the jobs held here (`on_cancel` stops each at its next step, as a local
  cancel does);
- every renewal interval it renews this trainer's leases; one that another
  trainer has taken over is marked lost, and its training stops at the next
  step without writing anything more (the fence refuses it anyway);
- every scan interval it queues again the unfinished jobs that no trainer
  holds (their trainer died), for any trainer of the pool to resume.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from shared.checkpoints.redis_client import StoreUnavailable
from trainer_svc import metrics
from trainer_svc.held_jobs import HeldJobs
from trainer_svc.job_repository import JobRepository
from trainer_svc.pool import JobPool
from trainer_svc.training import ActiveJob

log = logging.getLogger("tandem.trainer.jobs")
CANCEL_POLL_SECONDS = 0.25  # how often the owner looks for a cancel asked on another trainer


class LeaseKeeper:
    def __init__(
        self,
        pool: JobPool,
        repository: JobRepository,
        held: HeldJobs,
        on_cancel: Callable[[ActiveJob], object],
        *,
        renew_seconds: float,
        scan_seconds: float,
        requeue_orphans: bool,
    ):
        self._pool, self._repository, self._held = pool, repository, held
        self._on_cancel = on_cancel
        self._renew_every, self._scan_every = renew_seconds, scan_seconds
        self._scans = requeue_orphans  # False: this trainer resumes nothing (TRAINER_RESUME_INTERRUPTED)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="lease-keeper", daemon=True)

    def start(self) -> None:
        """Queue the orphans once now (a restarted trainer's own jobs among them), then keep going."""
        if self._scans:
            self.requeue_orphans()
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stopped.set()
        self._thread.join(timeout)

    def _keep(self) -> None:
        now = time.monotonic()
        next_renewal, next_scan = now + self._renew_every, now + self._scan_every
        while not self._stopped.wait(min(CANCEL_POLL_SECONDS, self._renew_every)):
            if time.monotonic() >= next_renewal:  # first: a cancel poll waiting on Redis must not delay it
                next_renewal = time.monotonic() + self._renew_every
                self.renew_leases()
            self.poll_cancels()
            if self._scans and time.monotonic() >= next_scan:
                next_scan = time.monotonic() + self._scan_every
                self.requeue_orphans()

    def poll_cancels(self) -> None:
        held = {job.record.job_id: job for job in self._held.all()}
        try:
            asked = self._pool.cancels_requested(list(held))
        except StoreUnavailable:
            return  # looked for again at the next poll
        for job_id in asked:
            job = held[job_id]
            with job.lock:
                if job.stop_as is not None or job.record.state.finished:
                    continue
            self._on_cancel(job)

    def renew_leases(self) -> None:
        for job in self._held.all():
            fence = job.writer.fence
            assert fence is not None  # HeldJobs holds only jobs taken from the pool, each under its token
            try:
                kept = self._pool.renew(job.record.job_id, fence)
            except StoreUnavailable as error:  # tried again next time; the fence keeps it safe
                log.warning("event=lease_renew_failed job=%s error=%r", job.record.job_id, str(error))
                continue
            if kept:
                metrics.LEASES_RENEWED.inc()
            else:
                log.warning("event=lease_lost job=%s owner=%s", job.record.job_id, self._pool.owner)
                self._held.lost(job)

    def requeue_orphans(self) -> None:
        """Queue the unfinished jobs no trainer holds (their trainer died), for any trainer to resume."""
        try:
            for record in self._repository.unfinished():
                if self._pool.requeue_orphan(record):
                    metrics.ORPHANS_REQUEUED.inc()
                    log.info("event=job_orphan_queued job=%s state=%s", record.job_id, record.state.value)
        except StoreUnavailable as error:
            log.warning("event=orphan_scan_failed error=%r", str(error))
