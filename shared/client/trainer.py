"""The trainer service's client (proto/tandem_trainer.proto): jobs, checkpoints and datasets.

    with TrainerClient("127.0.0.1:50051") as trainer:
        trainer.wait_until_ready(10)
        job = trainer.start_job("digits-cnn", "digits", preset="digits-cnn",
                                hyperparameters={"epochs": 5})
        for event in trainer.watch(job.job_id):
            ...

Each method returns the response's messages (Job, JobEvent, CheckpointInfo,
DatasetInfo) as they are.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from shared.client.connection import Connection, ServiceClient
from shared.rpc.convert import job_state_value, to_tensor
from shared.rpc.stubs import tandem_common_pb2, tandem_trainer_pb2_grpc
from shared.rpc.stubs import tandem_trainer_pb2 as pb

TRAINER_SERVICE = pb.DESCRIPTOR.services_by_name["Trainer"].full_name


class TrainerClient(ServiceClient):
    """A channel to one trainer; `timeout` bounds each call except `watch`."""

    service = TRAINER_SERVICE

    def __init__(self, target: str, timeout: float = 30.0, connection: Connection | None = None):
        super().__init__(target, timeout, connection)
        self._trainer = tandem_trainer_pb2_grpc.TrainerStub(self._channel)

    # ---------------------------------------------------------------- jobs

    def start_job(
        self,
        model_name: str,
        dataset: str,
        *,
        preset: str | None = None,
        spec: dict | None = None,
        hidden: Iterable[int] = (),
        hyperparameters: dict | None = None,
        every_steps: int = 0,
        every_epoch: bool = True,
        resume_from_version: int | None = None,
        request_id: str = "",
    ) -> pb.Job:
        """Queue a job training `preset` or `spec` on `dataset`; returns it QUEUED.

        `hyperparameters` maps Hyperparameters field names to values; a
        missing or None value keeps the default (the preset's, else the
        core's).
        """
        if preset is not None and spec is not None:
            raise ValueError("give a preset or a spec, not both")
        settings = {name: value for name, value in (hyperparameters or {}).items() if value is not None}
        request = pb.StartJobRequest(
            model_name=model_name,
            dataset=dataset,
            hidden=hidden,
            hyperparameters=pb.Hyperparameters(**settings),
            checkpoints=pb.CheckpointSchedule(every_steps=every_steps, every_epoch=every_epoch),
            resume_from_version=resume_from_version,
            request_id=request_id,
        )
        if preset is not None:
            request.preset = preset
        if spec is not None:
            request.spec_json = json.dumps(spec)
        return self._trainer.StartJob(request, timeout=self.timeout)

    def get_job(self, job_id: str) -> pb.Job:
        return self._trainer.GetJob(pb.GetJobRequest(job_id=job_id), timeout=self.timeout)

    def list_jobs(self, states: Iterable[str] = (), model_name: str = "", page_size: int = 0) -> list[pb.Job]:
        """Every job (newest first) in one of `states` (short names: shared.rpc.convert.JOB_STATE_NAMES),
        following the pages to the last."""
        request = pb.ListJobsRequest(
            states=[job_state_value(name) for name in states], model_name=model_name, page_size=page_size
        )
        jobs: list[pb.Job] = []
        while True:
            page = self._trainer.ListJobs(request, timeout=self.timeout)
            jobs.extend(page.jobs)
            if not page.next_page_token:
                return jobs
            request.page_token = page.next_page_token

    def watch(self, job_id: str) -> Iterator[pb.JobEvent]:
        """The job's events until it ends (its snapshot first, `finished` last); no deadline."""
        return self._trainer.WatchJob(pb.WatchJobRequest(job_id=job_id))

    def cancel(self, job_id: str) -> pb.Job:
        return self._trainer.CancelJob(pb.CancelJobRequest(job_id=job_id), timeout=self.timeout)

    # ---------------------------------------------------------------- checkpoints and datasets

    def list_checkpoints(self, model_name: str) -> list[tandem_common_pb2.CheckpointInfo]:
        """The model's retained versions, newest first."""
        response = self._trainer.ListCheckpoints(
            pb.ListCheckpointsRequest(model_name=model_name), timeout=self.timeout
        )
        return list(response.checkpoints)

    def list_datasets(self) -> list[pb.DatasetInfo]:
        response = self._trainer.ListDatasets(pb.ListDatasetsRequest(), timeout=self.timeout)
        return list(response.datasets)

    def upload_dataset(
        self,
        name: str,
        arrays: dict[str, np.ndarray],
        overwrite: bool = False,
        piece_bytes: int = 1 << 20,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> pb.DatasetInfo:
        """Upload arrays x_train, y_train, x_test, y_test (or x, y) as dataset `name`.

        Returns the dataset as the trainer loaded it; what is sent: `upload_chunks`.
        `on_progress(sent, total)` is called with the arrays' bytes handed to gRPC so
        far and in all: once before the first piece, then after each.
        """
        return self._trainer.UploadDataset(
            upload_chunks(name, arrays, overwrite, piece_bytes, on_progress), timeout=self.timeout
        )


def upload_chunks(
    name: str,
    arrays: dict[str, np.ndarray],
    overwrite: bool,
    piece_bytes: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> Iterator[pb.UploadDatasetChunk]:
    """The UploadDataset stream: a header declaring each array's dtype, shape, byte count and
    SHA-256, then each array's bytes (row-major, little-endian) in pieces of at most `piece_bytes`.

    The arrays are converted at once (one the wire cannot carry raises here, before any
    call); the pieces are cut as the stream is read, and `on_progress(sent, total)` told
    of each as gRPC takes it.
    """
    tensors = {array_name: to_tensor(array) for array_name, array in arrays.items()}
    total = sum(len(tensor.data) for tensor in tensors.values())
    header = pb.UploadDatasetHeader(
        name=name,
        overwrite=overwrite,
        arrays=[
            pb.DatasetArrayHeader(
                name=array_name,
                dtype=tensor.dtype,
                shape=tensor.shape,
                size_bytes=len(tensor.data),
                sha256=hashlib.sha256(tensor.data).hexdigest(),
            )
            for array_name, tensor in tensors.items()
        ],
    )
    report = on_progress or (lambda sent, total: None)

    def chunks() -> Iterator[pb.UploadDatasetChunk]:
        yield pb.UploadDatasetChunk(header=header)
        sent = 0
        report(sent, total)
        for array_name, tensor in tensors.items():
            for offset in range(0, len(tensor.data), piece_bytes):
                piece = tensor.data[offset : offset + piece_bytes]
                yield pb.UploadDatasetChunk(
                    piece=pb.DatasetArrayPiece(array=array_name, offset=offset, data=piece)
                )
                sent += len(piece)
                report(sent, total)

    return chunks()
