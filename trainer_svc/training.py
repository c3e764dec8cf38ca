"""Training one job: `JobRunner` trains it with shared.nn.run, `TrainingCallback` follows each step.

A running job's callback keeps the record's progress, emits events to
watchers, hands checkpoints to the publisher on schedule, and stops training
at a step boundary when the job is cancelled or the trainer shuts down. The
record goes to Redis through the job's RecordWriter (record_writer.py): an
epoch's record through a saver thread, a published checkpoint's with the
optimiser state that goes with it. A job resuming from its own checkpoint
resumes the optimiser too.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict

from shared.checkpoints.checkpoint import CheckpointMeta
from shared.checkpoints.store import CheckpointStore, FenceRejected
from shared.nn import EpochEvent, StepEvent, StopTraining, TrainingDiverged
from shared.nn.fit import check_finite_weights
from shared.nn.optim import Optimizer
from shared.nn.run import fit_model, prepare_model, prepare_optimizer
from trainer_svc import metrics
from trainer_svc.datasets import DatasetCatalog
from trainer_svc.events import CheckpointPublished, EpochDone, EventHub, StepProgress
from trainer_svc.jobs import JobRecord, JobState
from trainer_svc.publisher import CheckpointPublisher, Snapshot, snapshot
from trainer_svc.record_writer import RecordSaver, RecordWriter

log = logging.getLogger("tandem.trainer.jobs")
STEP_EVENT_INTERVAL = 0.25  # at most one step event per this many seconds


class ActiveJob:
    """A job this trainer holds: its live record, why it should stop, if it should, and its writer."""

    def __init__(self, record: JobRecord, writer: RecordWriter):
        self.record = record
        self.stop_as: JobState | None = None  # CANCELLED or INTERRUPTED once asked
        self.lock = threading.Lock()  # guards record, stop_as and lost
        self.writer = writer
        # In the trainer pool (trainer_svc.pool): set once another trainer took the job over.
        self.lost = False


class JobRunner:
    """Trains one job at a time (each on its caller's thread), from where its record stands to its end."""

    def __init__(
        self, store: CheckpointStore, catalog: DatasetCatalog, events: EventHub, *, outage_limit: float
    ):
        self._store, self._catalog, self._events = store, catalog, events
        self._outage_limit = outage_limit  # seconds Redis may be away before a job fails

    def run(self, job: ActiveJob) -> JobState:
        """Train `job`; the state it ends in. A failure ends it FAILED, with the error in its record.

        FenceRejected (this trainer lost the job to another) is raised: nothing more may be written.
        """
        try:
            return self._train(job)
        except FenceRejected:
            raise
        except TrainingDiverged as error:  # the caller's settings, not a bug: no traceback
            log.warning("event=job_diverged job=%s error=%r", job.record.job_id, str(error))
            with job.lock:
                job.record.error = str(error)
            return JobState.FAILED
        except Exception as error:  # any failure ends the job, clearly, with its traceback logged
            log.exception("event=job_failed job=%s", job.record.job_id)
            with job.lock:
                job.record.error = f"{type(error).__name__}: {error}"
            return JobState.FAILED

    def _train(self, job: ActiveJob) -> JobState:
        request = job.record.request
        hp = request.hyperparameters
        dataset = self._catalog.load(request.dataset)
        version = job.record.last_published_version or request.resume_from_version
        weights, start_step = None, 0
        if version:
            checkpoint = self._store.get(request.model_name, version)
            weights, start_step = checkpoint.model.state_dict(), checkpoint.meta.step
            with job.lock:  # epochs after that checkpoint will be trained again
                job.record.history = [e for e in job.record.history if e["step"] <= start_step]
        model = prepare_model(request.spec, dataset, hp, weights)
        # A job resuming from a checkpoint of its own resumes the optimiser saved with it. A job
        # started from another job's checkpoint (resume_from_version) starts a fresh optimiser:
        # the state belongs to the job that saved it.
        if job.record.last_published_version:
            optimizer = job.writer.resumed_optimizer(model, hp, version, start_step)
        else:
            optimizer = prepare_optimizer(model, hp)
        publisher = CheckpointPublisher(
            self._store,
            lambda v, item, seconds: self._published(job, v, item, seconds),
            outage_limit=self._outage_limit,
            on_failure=metrics.PUBLISH_FAILURES.inc,
            fence=job.writer.fence,
            last_version=job.record.last_published_version,
        )
        saver = RecordSaver(job.writer)
        callback = TrainingCallback(job, model, optimizer, publisher, saver, self._events, dataset.name)
        try:
            history = fit_model(model, dataset, hp, callback, start_step=start_step, optimizer=optimizer)
            with job.lock:
                stop_as = job.stop_as
                job.record.stop_reason = history.stop_reason
            if history.stop_reason != "stopped":
                final = JobState.SUCCEEDED
            elif stop_as is not None:
                final = stop_as
            else:  # only TrainingCallback stops training, and only once stop_as is set
                raise RuntimeError("training stopped without a reason to stop")
            callback.checkpoint()
            if not publisher.close(timeout=self._outage_limit + 5):
                raise publisher.error or RuntimeError("the final checkpoint was not published in time")
            return final
        finally:
            publisher.close(timeout=0)
            # A copy still waiting for Redis is superseded by the final one that JobManager._finish
            # saves next, under a higher number; one being written holds the writer's lock till done.
            saver.close(timeout=0)

    def _published(self, job: ActiveJob, version: int, item: Snapshot, seconds: float) -> None:
        metrics.PUBLISH_SECONDS.observe(seconds)
        meta = item.meta
        with job.lock:
            previous = (job.record.last_published_version, job.record.last_published_step)
            finished = job.record.state.finished  # its final record deleted the states
        if not finished:
            job.writer.save_optimizer_state(version, meta.step, item.optimizer_state, keep=previous)
        with job.lock:
            # The publisher publishes one snapshot at a time, in order, each above the last
            # (even on a Redis that lost its data): this version is the job's latest.
            job.record.last_published_version, job.record.last_published_step = version, meta.step
            number, record = job.writer.copy(job.record)
        job.writer.save(number, record)
        self._events.publish(record.job_id, CheckpointPublished({**asdict(meta), "version": version}))
        log.info(
            "event=checkpoint_published job=%s model=%s version=%d step=%d seconds=%.3f",
            record.job_id,
            record.model_name,
            version,
            meta.step,
            seconds,
        )


class TrainingCallback:
    """What shared.nn.run calls at each step and epoch of one job (see the module docstring)."""

    def __init__(
        self,
        job: ActiveJob,
        model,
        optimizer: Optimizer,
        publisher: CheckpointPublisher,
        saver: RecordSaver,
        events: EventHub,
        dataset: str,
    ):
        self.job, self.model, self.optimizer = job, model, optimizer
        self.publisher, self.saver, self.events = publisher, saver, events
        self.dataset = dataset
        self.request = job.record.request
        self.last_event = 0.0
        self.last_checkpoint_step = -1
        self.window_started, self.window_step = time.monotonic(), job.record.step

    def __call__(self, event) -> None:
        if isinstance(event, StepEvent):
            self._step(event)
        elif isinstance(event, EpochEvent):
            self._epoch(event)
        if self.publisher.error:
            raise self.publisher.error
        if isinstance(self.saver.error, FenceRejected):
            raise self.saver.error
        if self.job.lost:
            raise FenceRejected(f"job {self.job.record.job_id}: its lease was lost to another trainer")
        with self.job.lock:
            stop = self.job.stop_as
        # A stop at an epoch's last step waits for that epoch's end, a moment later: a run
        # resumed at that step starts with the next epoch, so this one would lose its metrics.
        if stop and not (isinstance(event, StepEvent) and event.step % event.steps_per_epoch == 0):
            raise StopTraining

    def _step(self, event: StepEvent) -> None:
        hp = self.request.hyperparameters
        now = time.monotonic()
        with self.job.lock:
            record = self.job.record
            record.epoch, record.step = event.epoch, event.step
            record.steps_total = hp.epochs * event.steps_per_epoch
            if now - self.window_started >= 1.0:
                record.samples_per_second = (
                    (event.step - self.window_step) * hp.batch_size / (now - self.window_started)
                )
                self.window_started, self.window_step = now, event.step
                metrics.SAMPLES_PER_SECOND.set(record.samples_per_second)
        metrics.STEPS.inc()
        if now - self.last_event >= STEP_EVENT_INTERVAL:
            self.last_event = now
            self.events.publish(
                self.job.record.job_id,
                StepProgress(
                    event.epoch,
                    event.step,
                    event.steps_per_epoch,
                    event.batch_loss,
                    event.batch_accuracy,
                    self.job.record.samples_per_second,
                ),
            )
        every = self.request.checkpoint_every_steps
        if every and event.step % every == 0:
            self.checkpoint()

    def _epoch(self, event: EpochEvent) -> None:
        entry = {**event.metrics, "step": event.step}
        with self.job.lock:
            self.job.record.history.append(entry)
            number, record = self.job.writer.copy(self.job.record)
        self.saver.submit((number, record))
        self.events.publish(record.job_id, EpochDone(dict(entry)))
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
                model_name=record.model_name,
                spec=self.model.spec,
                dtype=self.model.dtype.name,
                step=record.step,
                epoch=record.epoch,
                metrics=dict(record.last_metrics),
                dataset=self.dataset,
                hyperparameters=self.request.hyperparameters.as_dict(),
            )
        self.publisher.submit(snapshot(self.model, meta, self.optimizer.state_dict()))
