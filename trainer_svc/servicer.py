"""The Trainer gRPC servicer: translates between protobuf and the job manager, the
checkpoint store and the dataset catalog, nothing more.

Status codes: a stored checkpoint that fails verification (CheckpointError)
-> FAILED_PRECONDITION; ValueError (a spec, hyperparameter or field that cannot work)
-> INVALID_ARGUMENT; LookupError (unknown job, preset, dataset, model or
version) -> NOT_FOUND; an existing upload -> ALREADY_EXISTS; an upload over
the size limit -> RESOURCE_EXHAUSTED; another caller's job or dataset (NotPermitted) ->
PERMISSION_DENIED; Redis unreachable (also every call while the trainer waits
for its Redis at start: trainer_svc.redis_wait), the trainer shutting down, or a
watched job moving to another trainer (watch again) -> UNAVAILABLE.
Messages come from the domain and name the field.

Each call passes its caller (shared.security.auth.current_caller(), set by the access
interceptor) to the domain, which decides whose jobs and datasets it reaches.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import grpc

from shared.checkpoints.checkpoint import CheckpointError
from shared.checkpoints.redis_client import StoreUnavailable
from shared.checkpoints.store import CheckpointStore
from shared.nn import spec_to_json
from shared.rpc.convert import checkpoint_info, job_state_name, job_state_value, timestamp
from shared.rpc.errors import translate_errors
from shared.rpc.stubs import tandem_trainer_pb2 as pb
from shared.rpc.stubs import tandem_trainer_pb2_grpc
from shared.security.auth import NotPermitted, current_caller
from trainer_svc.datasets import ArrayHeader, DatasetCatalog, DatasetSummary
from trainer_svc.events import (
    CheckpointPublished,
    EpochDone,
    JobFinished,
    JobMoved,
    JobSnapshot,
    StepProgress,
    WatchMoved,
)
from trainer_svc.jobs import JobRecord, JobState, JobSubmission
from trainer_svc.manager import JobManager, NotAccepting
from trainer_svc.redis_wait import RedisWait

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000  # a larger page_size is served as this many
WATCH_POLL_SECONDS = 1.0  # how often a quiet watch checks that its client is still there

STATUS_BY_ERROR = [  # the first match wins
    (CheckpointError, grpc.StatusCode.FAILED_PRECONDITION),  # a ValueError, but not the caller's
    (FileExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (OverflowError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (LookupError, grpc.StatusCode.NOT_FOUND),
    (NotPermitted, grpc.StatusCode.PERMISSION_DENIED),
    (StoreUnavailable, grpc.StatusCode.UNAVAILABLE),
    (NotAccepting, grpc.StatusCode.UNAVAILABLE),
    (WatchMoved, grpc.StatusCode.UNAVAILABLE),
]
# Every Trainer call: refused while the trainer waits for its Redis (WaitingForRedis, a
# StoreUnavailable), then whatever the domain raises, translated by the table above.
answer = translate_errors(STATUS_BY_ERROR, check=lambda servicer: servicer.redis_wait.check())


HYPERPARAMETER_FIELDS = [f.name for f in pb.Hyperparameters.DESCRIPTOR.fields]


def submission_from_proto(request: pb.StartJobRequest) -> JobSubmission:
    spec_json = request.spec_json if request.WhichOneof("architecture") == "spec_json" else None
    hp = request.hyperparameters
    return JobSubmission(
        model_name=request.model_name,
        dataset=request.dataset,
        preset=request.preset,
        spec_json=spec_json,
        hidden=tuple(request.hidden),
        hyperparameters={name: getattr(hp, name) for name in HYPERPARAMETER_FIELDS if hp.HasField(name)},
        checkpoint_every_steps=request.checkpoints.every_steps,
        checkpoint_every_epoch=request.checkpoints.every_epoch,
        resume_from_version=request.resume_from_version,
        request_id=request.request_id,
    )


def requested_states(values) -> set[JobState]:
    try:
        return {JobState(job_state_name(value)) for value in values}
    except ValueError as error:
        raise ValueError(f"states: {error}") from None


def page_offset(token: str) -> int:
    """The offset a next_page_token names: the decimal string this server gave ("" = the start)."""
    if not token:
        return 0
    if not (len(token) <= 12 and token.isascii() and token.isdigit()):
        raise ValueError(f"page_token {token[:40]!r} is not one this server gave")
    return int(token)


def epoch_metrics(metrics: dict) -> pb.EpochMetrics:
    fields = {f.name for f in pb.EpochMetrics.DESCRIPTOR.fields}
    return pb.EpochMetrics(**{k: v for k, v in metrics.items() if k in fields})


def job_to_proto(record: JobRecord) -> pb.Job:
    request = record.request
    hp = request.hyperparameters.as_dict()
    submitted = pb.StartJobRequest(
        model_name=request.model_name,
        dataset=request.dataset,
        hyperparameters=pb.Hyperparameters(**hp),
        checkpoints=pb.CheckpointSchedule(
            every_steps=request.checkpoint_every_steps, every_epoch=request.checkpoint_every_epoch
        ),
        request_id=request.request_id,
    )
    if request.preset:
        submitted.preset = request.preset
        submitted.hidden.extend(request.hidden)
    else:
        submitted.spec_json = spec_to_json(request.spec)
    if request.resume_from_version:
        submitted.resume_from_version = request.resume_from_version
    history = [epoch_metrics(m) for m in record.history]
    return pb.Job(
        job_id=record.job_id,
        model_name=record.model_name,
        state=job_state_value(record.state.value),
        request=submitted,
        progress=pb.Progress(
            epoch=record.epoch,
            epochs=request.hyperparameters.epochs,
            step=record.step,
            steps_total=record.steps_total,
            samples_per_second=record.samples_per_second,
        ),
        last_metrics=history[-1] if history else None,
        last_published_version=record.last_published_version,
        error=record.error,
        restarts=record.restarts,
        created_at=timestamp(record.created_at),
        started_at=timestamp(record.started_at),
        finished_at=timestamp(record.finished_at),
        hyperparameters=pb.Hyperparameters(**hp),
        spec_json=spec_to_json(request.spec),
        history=history,
        stop_reason=record.stop_reason,
        trainer=record.trainer,
    )


class TrainerServicer(tandem_trainer_pb2_grpc.TrainerServicer):
    def __init__(
        self, jobs: JobManager, store: CheckpointStore, catalog: DatasetCatalog, redis_wait: RedisWait
    ):
        self.jobs, self.store, self.catalog = jobs, store, catalog
        self.redis_wait = redis_wait

    @answer
    def StartJob(self, request, context):
        return job_to_proto(self.jobs.submit(submission_from_proto(request), current_caller()))

    @answer
    def GetJob(self, request, context):
        return job_to_proto(self.jobs.get(request.job_id, current_caller()))

    @answer
    def ListJobs(self, request, context):
        states = requested_states(request.states)
        if request.page_size < 0:
            raise ValueError(f"page_size must be >= 0 (0: {DEFAULT_PAGE_SIZE}), got {request.page_size}")
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)  # as AIP-158 says
        offset = page_offset(request.page_token)
        jobs = [
            r
            for r in self.jobs.list(current_caller())
            if (not states or r.state in states)
            and (not request.model_name or r.model_name == request.model_name)
        ]
        page = jobs[offset : offset + page_size]
        more = offset + page_size < len(jobs)
        return pb.ListJobsResponse(
            jobs=[job_to_proto(r) for r in page], next_page_token=str(offset + page_size) if more else ""
        )

    @answer
    def WatchJob(self, request, context):
        record, subscription = self.jobs.watch(request.job_id, current_caller())
        try:
            yield self._event(record.job_id, snapshot=job_to_proto(record))
            while context.is_active():
                event = subscription.next(timeout=WATCH_POLL_SECONDS)
                if event is None:
                    continue
                if isinstance(event, JobMoved):
                    raise WatchMoved(
                        f"job_id {record.job_id!r}: another trainer holds the job now; watch it again"
                    )
                yield self._event_from(record.job_id, event)
                if isinstance(event, JobFinished):
                    return
        finally:
            subscription.close()

    @answer
    def CancelJob(self, request, context):
        return job_to_proto(self.jobs.cancel(request.job_id, current_caller()))

    @answer
    def ListCheckpoints(self, request, context):
        versions = self.store.versions(request.model_name)
        if not versions:
            raise LookupError(f"model_name {request.model_name!r} has no checkpoints")
        latest = self.store.latest_version(request.model_name)
        return pb.ListCheckpointsResponse(
            checkpoints=[
                checkpoint_info(meta, latest=meta["version"] == latest) for meta in reversed(versions)
            ]
        )

    @answer
    def ListDatasets(self, request, context):
        return pb.ListDatasetsResponse(datasets=[dataset_info(s) for s in self.catalog.summaries()])

    @answer
    def UploadDataset(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("chunk") != "header":
            raise ValueError("the first chunk must be the header")
        header = first.header
        upload = self.catalog.begin_upload(
            header.name,
            [ArrayHeader(a.name, a.dtype, tuple(a.shape), a.size_bytes, a.sha256) for a in header.arrays],
            overwrite=header.overwrite,
            uploader=current_caller(),
        )
        for chunk in request_iterator:
            if chunk.WhichOneof("chunk") != "piece":
                raise ValueError("only the first chunk may be a header")
            upload.add(chunk.piece.array, chunk.piece.offset, chunk.piece.data)
        return dataset_info(self.catalog.store_upload(upload))

    # ---------------------------------------------------------------- events

    @staticmethod
    def _event(job_id: str, **event) -> pb.JobEvent:
        return pb.JobEvent(job_id=job_id, time=timestamp(time.time()), **event)

    def _event_from(self, job_id: str, event) -> pb.JobEvent:
        if isinstance(event, StepProgress):
            return self._event(job_id, step=pb.StepProgress(**asdict(event)))
        if isinstance(event, EpochDone):
            return self._event(job_id, epoch=epoch_metrics(event.metrics))
        if isinstance(event, CheckpointPublished):
            return self._event(job_id, checkpoint=checkpoint_info(event.meta))
        if isinstance(event, JobSnapshot):
            return self._event(job_id, snapshot=job_to_proto(event.record))
        return self._event(job_id, finished=job_to_proto(event.record))


def dataset_info(summary: DatasetSummary) -> pb.DatasetInfo:
    return pb.DatasetInfo(
        name=summary.name,
        input_shape=summary.input_shape,
        num_classes=summary.num_classes,
        train_size=summary.train_size,
        test_size=summary.test_size,
        source=summary.source,
    )
