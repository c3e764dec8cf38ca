"""The job manager: checks requests, queues jobs, runs them, and reports on them.

Jobs run on worker threads of their own (at most `max_concurrent` at once;
the rest wait QUEUED), so the gRPC threads stay free. Each running job
trains with `shared.nn.run`, whose callback here keeps the record's
progress, emits events to watchers, publishes checkpoints on schedule, and
stops training at a step boundary when the job is cancelled or the trainer
shuts down. Records are saved to Redis at every change of state, epoch and
checkpoint, so a restarted trainer lists them and resumes the unfinished;
an epoch's record goes through a saver thread of the job's own, so that the
training thread never waits for Redis. With each checkpoint goes the
optimiser's state (job_store.py), and a job resuming from its own checkpoint
resumes the optimiser too.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field

from shared.security.auth import Caller, NotPermitted
from shared.checkpoints.backoff import Backoff
from shared.checkpoints.checkpoint import CheckpointMeta, check_model_name
from shared.nn import EpochEvent, StepEvent, StopTraining, TrainingDiverged, build_model
from shared.nn.fit import check_finite_weights
from shared.nn.optim import Optimizer
from shared.nn.presets import get_preset
from shared.checkpoints.redis_client import StoreUnavailable
from shared.checkpoints.store import CheckpointNotFound, CheckpointStore
from shared.nn.run import Hyperparameters, check_fits, fit_model, prepare_model, prepare_optimizer
from trainer_svc import metrics
from trainer_svc.background import NewestOnly
from trainer_svc.datasets import DatasetCatalog
from trainer_svc.events import (CheckpointPublished, EpochDone, EventHub, JobFinished,
                                JobSnapshot, StepProgress, Subscription)
from trainer_svc.job_store import JobRepository
from trainer_svc.jobs import JobRecord, JobRequest, JobState, check_request_id, is_job_id
from trainer_svc.limits import JobLimits
from trainer_svc.publisher import CheckpointPublisher, Snapshot

log = logging.getLogger("tandem.trainer.jobs")


class JobNotFound(LookupError):
    pass


class NotAccepting(RuntimeError):
    """The trainer is shutting down and takes no new jobs."""


def _allow(allowed: bool, job_id: str, why: str) -> None:
    """Refuse a caller another's job (NotPermitted: PERMISSION_DENIED), saying who may."""
    if not allowed:
        raise NotPermitted(f"job_id {job_id!r} is another caller's job; {why}")


@dataclass(frozen=True)
class StartJob:
    """A request as a client states it; `JobManager.check` turns it into a JobRequest."""

    model_name: str
    dataset: str
    preset: str = ""
    spec_json: str | None = None        # the spec as the client sent it, not parsed yet
    hidden: tuple[int, ...] = ()
    hyperparameters: dict = field(default_factory=dict)  # only the settings given
    checkpoint_every_steps: int = 0
    checkpoint_every_epoch: bool = True
    resume_from_version: int = 0
    request_id: str = ""


@dataclass
class Settings:
    max_concurrent: int = 1
    outage_limit: float = 60.0          # seconds Redis may be away before a job fails
    step_event_interval: float = 0.25   # at most one step event per this many seconds
    max_restarts: int = 3
    resume_interrupted: bool = True
    limits: JobLimits = field(default_factory=JobLimits)


class _ActiveJob:
    """A job this trainer holds: its live record and why it should stop, if it should."""

    def __init__(self, record: JobRecord):
        self.record = record
        self.stop_as: JobState | None = None   # CANCELLED or INTERRUPTED once asked
        self.lock = threading.Lock()
        # Copies of the record are saved from several threads (training loop, publisher,
        # cancel); each copy is numbered under `lock` and a copy older than the one already
        # in Redis is never written over it (see JobManager._save_copy).
        self.copies = 0
        self.saved_copy = 0
        self.save_lock = threading.Lock()

    def copy_for_saving(self) -> tuple[int, JobRecord]:
        """A numbered copy of the record; the caller holds `lock`."""
        self.copies += 1
        return self.copies, self.record.copy()


class JobManager:
    def __init__(self, store: CheckpointStore, repository: JobRepository,
                 catalog: DatasetCatalog, settings: Settings | None = None):
        self.store, self.repository, self.catalog = store, repository, catalog
        self.settings = settings or Settings()
        self.events = EventHub()
        self._queue: queue.Queue[_ActiveJob | None] = queue.Queue()
        self._active: dict[str, _ActiveJob] = {}
        self._lock = threading.Lock()
        self._accepting = True
        self._workers = [threading.Thread(target=self._work, name=f"job-worker-{i}", daemon=True)
                         for i in range(self.settings.max_concurrent)]

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the workers, first queueing the unfinished jobs of an earlier run."""
        if self.settings.resume_interrupted:
            for record in self.repository.unfinished():
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

    def check(self, start: StartJob) -> JobRequest:
        """Validate everything before a job exists; raise ValueError or LookupError naming the field.

        Cheap checks come first, and nothing is allocated for the model: its size
        and training memory are checked against the limits from its inferred shapes.
        """
        check_model_name(start.model_name)
        check_request_id(start.request_id)
        dataset = self.catalog.load(start.dataset)
        if bool(start.preset) == (start.spec_json is not None):
            raise ValueError("architecture: give exactly one of preset or spec_json")
        limits = self.settings.limits
        if start.preset:
            if start.hidden:   # a preset's spec has two layers per hidden width, and three more
                limits.check_layer_count(2 * len(start.hidden) + 3)
            spec = get_preset(start.preset).spec(dataset.input_shape, dataset.num_classes,
                                                 start.hidden or None)
            hp = Hyperparameters.for_preset(start.preset, **start.hyperparameters)
        else:
            if start.hidden:
                raise ValueError("hidden: only a preset takes hidden-layer widths; a spec states its own")
            spec = limits.parse_spec(start.spec_json)
            if isinstance(spec, dict) and isinstance(spec.get("layers"), list):
                limits.check_layer_count(len(spec["layers"]))
            hp = Hyperparameters.from_dict(start.hyperparameters)
        model = build_model(spec, dtype=hp.dtype)   # shapes only: no weights yet
        train_samples = int(len(dataset.y_train) * (1 - hp.validation_split))
        if hp.batch_size > train_samples:
            raise ValueError(f"hyperparameters.batch_size {hp.batch_size} is larger than the "
                             f"{train_samples} training samples of {dataset.name!r}")
        limits.check_job(model, hp.batch_size, len(prepare_optimizer(model, hp).slots),
                         steps=hp.epochs * -(-train_samples // hp.batch_size))
        check_fits(model, dataset)
        spec = model.spec
        if start.checkpoint_every_steps < 0:
            raise ValueError("checkpoint_schedule.every_steps must be >= 0")
        if start.resume_from_version:
            try:
                meta = self.store.get(start.model_name, start.resume_from_version).meta
            except CheckpointNotFound as error:
                raise CheckpointNotFound(f"resume_from_version {start.resume_from_version}: {error}") from None
            if meta.spec != spec:
                raise ValueError(f"resume_from_version {start.resume_from_version} of "
                                 f"{start.model_name!r} has another architecture than this job")
        return JobRequest(
            model_name=start.model_name, dataset=dataset.name, spec=spec, hyperparameters=hp,
            preset=start.preset, hidden=start.hidden, checkpoint_every_steps=start.checkpoint_every_steps,
            checkpoint_every_epoch=start.checkpoint_every_epoch,
            resume_from_version=start.resume_from_version, request_id=start.request_id)

    def submit(self, start: StartJob, caller: Caller) -> JobRecord:
        """Queue a new job of `caller`'s, or return the job an earlier call with the same request_id made."""
        with self._lock:
            if not self._accepting:
                raise NotAccepting("the trainer is shutting down and takes no new jobs")
        record = JobRecord.new(self.check(start), owner=caller.identity)
        earlier = self.repository.save_new(record, start.request_id)
        if earlier:
            return self.get(earlier, caller)
        job = _ActiveJob(record)
        with self._lock:
            self._active[record.job_id] = job
        self._queue.put(job)
        log.info("event=job_queued job=%s model=%s dataset=%s", record.job_id,
                 record.model_name, record.request.dataset)
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
        record = self.repository.get(job_id)
        if record is None:
            raise JobNotFound(f"job_id {job_id!r}: no such job")
        return record

    def list(self, caller: Caller, state: JobState | None = None, limit: int | None = None,
             offset: int = 0) -> list[JobRecord]:
        """The jobs `caller` may see (Caller.sees)."""
        records = [r for r in self.repository.list() if caller.sees(r.owner)]
        with self._lock:
            live = {job_id: job for job_id, job in self._active.items()}
        records = [self._record(r.job_id) if r.job_id in live else r for r in records]
        if state:
            records = [r for r in records if r.state == state]
        return records[offset:None if limit is None else offset + limit]

    def cancel(self, job_id: str, caller: Caller) -> JobRecord:
        """Cancel a job `caller` controls: its own, or anyone's as admin (Caller.controls)."""
        _allow(caller.controls(self._record(job_id).owner), job_id,
               "a caller cancels its own jobs only (admin: anyone's)")
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
            number, record = job.copy_for_saving()
            # Under the job's lock, like the final save in _finish: this record cannot
            # overwrite the final one, nor its event follow the job's last.
            self._save_copy(job, number, record)
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

    def _requeue(self, record: JobRecord) -> None:
        job = _ActiveJob(record)
        if record.state == JobState.CANCELLING:  # the trainer stopped while it was cancelling
            self._finish(job, JobState.CANCELLED)
            return
        if record.state in (JobState.RUNNING, JobState.INTERRUPTED):
            record.restarts += 1
        if record.restarts > self.settings.max_restarts:
            record.error = f"gave up after {self.settings.max_restarts} restarts"
            self._finish(job, JobState.FAILED)
            return
        record.state = JobState.QUEUED
        self._save_copy(job, *job.copy_for_saving())
        with self._lock:
            self._active[record.job_id] = job
        self._queue.put(job)
        log.info("event=job_resumable job=%s restarts=%d from_version=%d", record.job_id,
                 record.restarts, record.last_published_version)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            with job.lock:
                if job.record.state.finished:
                    continue
                if job.stop_as == JobState.INTERRUPTED:
                    continue  # shutting down before it started: stays QUEUED for the next trainer
                job.record.state = JobState.RUNNING
                job.record.started_at = job.record.started_at or time.time()
                number, record = job.copy_for_saving()
            self._save_copy(job, number, record)
            self.events.publish(record.job_id, JobSnapshot(record))
            try:
                final = self._train(job)
            except TrainingDiverged as error:   # the caller's settings, not a bug: no traceback
                log.warning("event=job_diverged job=%s error=%r", job.record.job_id, str(error))
                with job.lock:
                    job.record.error = str(error)
                final = JobState.FAILED
            except Exception as error:  # noqa: BLE001 - any failure ends the job, clearly
                log.exception("event=job_failed job=%s", job.record.job_id)
                with job.lock:
                    job.record.error = f"{type(error).__name__}: {error}"
                final = JobState.FAILED
            with job.lock:
                self._finish(job, final)

    def _train(self, job: _ActiveJob) -> JobState:
        request = job.record.request
        hp = request.hyperparameters
        dataset = self.catalog.load(request.dataset)
        version = job.record.last_published_version or request.resume_from_version
        weights, start_step = None, 0
        if version:
            checkpoint = self.store.get(request.model_name, version)
            weights, start_step = checkpoint.model.state_dict(), checkpoint.meta.step
            with job.lock:  # epochs after that checkpoint will be trained again
                job.record.history = [e for e in job.record.history if e["step"] <= start_step]
        model = prepare_model(request.spec, dataset, hp, weights)
        optimizer = self._optimizer(job, model, version, start_step)
        publisher = CheckpointPublisher(
            self.store, lambda v, item, seconds: self._published(job, v, item, seconds),
            outage_limit=self.settings.outage_limit, on_failure=metrics.PUBLISH_FAILURES.inc)
        saver = _RecordSaver(self, job)
        progress = _Progress(self, job, model, optimizer, publisher, saver, dataset.name)
        try:
            history = fit_model(model, dataset, hp, progress, start_step=start_step, optimizer=optimizer)
            with job.lock:
                stop_as = job.stop_as
                job.record.stop_reason = history.stop_reason
            final = JobState.SUCCEEDED if history.stop_reason != "stopped" else stop_as
            progress.checkpoint()
            if not publisher.close(timeout=self.settings.outage_limit + 5):
                raise publisher.error or RuntimeError("the final checkpoint was not published in time")
            return final
        finally:
            publisher.close(timeout=0)
            # A copy still waiting for Redis is superseded by the final one that _finish saves
            # next, under a higher number; one being written holds the job's save lock till done.
            saver.close(timeout=0)

    def _optimizer(self, job: _ActiveJob, model, version: int, step: int) -> Optimizer:
        """A fresh optimiser, or for a job resuming from a checkpoint of its own, the one saved with it.

        A job started from another job's checkpoint (resume_from_version) starts a fresh
        optimiser: the state belongs to the job that saved it.
        """
        hp = job.record.request.hyperparameters
        if not job.record.last_published_version:
            return prepare_optimizer(model, hp)
        try:
            state = self.repository.optimizer_state(job.record.job_id, version, step)
            if state is not None:
                return prepare_optimizer(model, hp, state)
            reason = "none stored for this checkpoint"
        except ValueError as error:
            reason = str(error)
        log.warning("event=optimizer_state_missing job=%s version=%d step=%d reason=%r",
                    job.record.job_id, version, step, reason)
        return prepare_optimizer(model, hp)

    def _published(self, job: _ActiveJob, version: int, item: Snapshot, seconds: float) -> None:
        metrics.PUBLISH_SECONDS.observe(seconds)
        meta = item.meta
        with job.lock:
            previous = (job.record.last_published_version, job.record.last_published_step)
            finished = job.record.state.finished   # its final record deleted the states
        if not finished:
            self._save_optimizer_state(job.record.job_id, version, item, keep=previous)
        with job.lock:
            # The publisher publishes one snapshot at a time, in order, so this version is the
            # job's latest even when it is lower: a Redis that lost its data counts from 1 again.
            job.record.last_published_version, job.record.last_published_step = version, meta.step
            number, record = job.copy_for_saving()
        self._save_copy(job, number, record)
        self.events.publish(record.job_id, CheckpointPublished({**asdict(meta), "version": version}))
        log.info("event=checkpoint_published job=%s model=%s version=%d step=%d seconds=%.3f",
                 record.job_id, record.model_name, version, meta.step, seconds)

    def _save_optimizer_state(self, job_id: str, version: int, item: Snapshot,
                              keep: tuple[int, int]) -> None:
        """Best effort, before the record names `version`: the state of checkpoint `keep` stays."""
        try:
            self.repository.save_optimizer_state(job_id, version, item.meta.step,
                                                 item.optimizer_state, keep=keep)
        except StoreUnavailable as error:
            log.warning("event=optimizer_state_save_failed job=%s version=%d error=%r",
                        job_id, version, str(error))

    def _finish(self, job: _ActiveJob, state: JobState) -> None:
        """Record the final state (caller holds job.lock) and tell the watchers.

        A final record that Redis does not take now is saved again by a thread of its
        own until it does (within the outage limit); the job stays in `_active` till
        then, so that GetJob answers from it and not from the stale record in Redis.
        """
        job.record.state = state
        if state.finished:
            job.record.finished_at = time.time()
        number, record = job.copy_for_saving()
        if self._save_copy(job, number, record) or not state.finished:
            self._forget(record.job_id)
        else:
            threading.Thread(target=self._save_final, args=(job, number, record), daemon=True,
                             name=f"save-{record.job_id}").start()
        event = JobFinished(record) if state.finished else JobSnapshot(record)
        self.events.publish(record.job_id, event)
        log.info("event=job_%s job=%s model=%s version=%d error=%r", state.value.lower(),
                 record.job_id, record.model_name, record.last_published_version, record.error)

    def _save_copy(self, job: _ActiveJob, number: int, record: JobRecord) -> bool:
        """Best effort (`_write_copy`): a Redis outage must not stop training; the next save catches up."""
        try:
            self._write_copy(job, number, record)
            return True
        except StoreUnavailable as error:
            log.warning("event=job_save_failed job=%s error=%r", record.job_id, str(error))
            return False

    def _write_copy(self, job: _ActiveJob, number: int, record: JobRecord) -> None:
        """Save a numbered copy of the job's record unless a later copy is in Redis already.

        Copies are taken under the job's lock but saved outside it, from several threads;
        without this, a copy taken before a checkpoint was published (an epoch's end on
        the training thread) could land after the copy that records that checkpoint, and a
        trainer that died then would resume from the checkpoint before.
        Raises StoreUnavailable.
        """
        with job.save_lock:
            if number > job.saved_copy:
                self.repository.save(record)
                job.saved_copy = number

    def _save_final(self, job: _ActiveJob, number: int, record: JobRecord,
                    backoff: tuple[float, float] = (0.2, 5.0)) -> None:
        """Save a job's final record, retrying with backoff; there is no next save to catch up."""
        deadline = time.monotonic() + self.settings.outage_limit
        delays = Backoff(*backoff)
        while not self._save_copy(job, number, record):
            delay = delays.next()
            if time.monotonic() + delay > deadline:
                log.error("event=job_record_not_saved job=%s state=%s", record.job_id, record.state.value)
                return  # kept in _active: this trainer still answers for the job
            time.sleep(delay)
        self._forget(record.job_id)

    def _forget(self, job_id: str) -> None:
        with self._lock:
            self._active.pop(job_id, None)


class _RecordSaver(NewestOnly[tuple[int, JobRecord]]):
    """Saves the numbered record copies a job's training loop hands over, off its thread.

    Only the newest copy waits (an older one is superseded, never written after
    it); while Redis is away it is retried with backoff until it is saved,
    superseded, or the saver closed. `_write_copy` keeps it from landing over a
    newer copy that another thread saved meanwhile.
    """

    def __init__(self, manager: JobManager, job: _ActiveJob):
        self._manager, self._job = manager, job
        super().__init__(f"record-saver-{job.record.job_id}")

    def _handle(self, item: tuple[int, JobRecord]) -> None:
        self._manager._write_copy(self._job, *item)

    def _failed(self, item: tuple[int, JobRecord], error: StoreUnavailable, retry_in: float) -> None:
        log.warning("event=job_save_failed job=%s error=%r retry_in=%.1fs",
                    self._job.record.job_id, str(error), retry_in)


class _Progress:
    """The training callback of one job (see the module docstring)."""

    def __init__(self, manager: JobManager, job: _ActiveJob, model, optimizer: Optimizer,
                 publisher: CheckpointPublisher, saver: _RecordSaver, dataset: str):
        self.manager, self.job, self.model, self.optimizer = manager, job, model, optimizer
        self.publisher, self.saver = publisher, saver
        self.dataset = dataset
        self.request = job.record.request
        self.last_event = 0.0
        self.last_checkpoint_step = -1
        self.window_started, self.window_step = time.monotonic(), job.record.step
        self.epoch = 0

    def __call__(self, event) -> None:
        if isinstance(event, StepEvent):
            self._step(event)
        elif isinstance(event, EpochEvent):
            self._epoch(event)
        if self.publisher.error:
            raise self.publisher.error
        with self.job.lock:
            stop = self.job.stop_as
        # A stop at an epoch's last step waits for that epoch's end, a moment later: a run
        # resumed at that step starts with the next epoch, so this one would lose its metrics.
        if stop and not (isinstance(event, StepEvent) and event.step % event.steps_per_epoch == 0):
            raise StopTraining

    def _step(self, event: StepEvent) -> None:
        hp = self.request.hyperparameters
        now = time.monotonic()
        self.epoch = event.epoch
        with self.job.lock:
            record = self.job.record
            record.epoch, record.step = event.epoch, event.step
            record.steps_total = hp.epochs * event.steps_per_epoch
            if now - self.window_started >= 1.0:
                record.samples_per_second = ((event.step - self.window_step) * hp.batch_size
                                             / (now - self.window_started))
                self.window_started, self.window_step = now, event.step
                metrics.SAMPLES_PER_SECOND.set(record.samples_per_second)
        metrics.STEPS.inc()
        if now - self.last_event >= self.manager.settings.step_event_interval:
            self.last_event = now
            self.manager.events.publish(self.job.record.job_id, StepProgress(
                event.epoch, event.step, event.steps_per_epoch, event.batch_loss, event.batch_accuracy,
                self.job.record.samples_per_second))
        every = self.request.checkpoint_every_steps
        if every and event.step % every == 0:
            self.checkpoint()

    def _epoch(self, event: EpochEvent) -> None:
        entry = {**event.metrics, "step": event.step}
        with self.job.lock:
            self.job.record.history.append(entry)
            number, record = self.job.copy_for_saving()
        self.saver.submit((number, record))
        self.manager.events.publish(record.job_id, EpochDone(dict(entry)))
        if self.request.checkpoint_every_epoch:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Hand the current weights and optimiser state to the publisher (once per step).

        Weights that became non-finite since the last finite loss end the job as diverged
        here, before they reach the publisher (whose store would refuse them).
        """
        with self.job.lock:
            record = self.job.record
            if record.step == self.last_checkpoint_step:
                return
            self.last_checkpoint_step = record.step
            check_finite_weights(self.model, record.step)
            meta = CheckpointMeta(
                model_name=record.model_name, spec=self.model.spec, dtype=self.model.dtype.name,
                step=record.step, epoch=record.epoch, metrics=dict(record.last_metrics),
                dataset=self.dataset, hyperparameters=self.request.hyperparameters.as_dict())
        self.publisher.submit(self.model, meta, self.optimizer.state_dict())
