"""Thin Python clients for the trainer service (proto/tandem_trainer.proto) and the
inference service (proto/tandem_inference.proto).

    with TrainerClient("127.0.0.1:50051") as trainer:
        trainer.wait_until_ready(10)
        job = trainer.start_job("digits-cnn", "digits", preset="digits-cnn",
                                hyperparameters={"epochs": 5})
        for event in trainer.watch(job.job_id):
            ...

    with InferenceClient("127.0.0.1:50052") as inference:
        inference.wait_until_ready(10)
        prediction = inference.predict("digits-cnn", x_test)   # x_test: [N, 1, 8, 8]
        prediction.classes, prediction.probabilities, prediction.version

Each method turns Python values into the request message, makes one call
and returns the response's messages (Job, JobEvent, CheckpointInfo,
DatasetInfo, ModelMetadata) as they are; every check happens on the
server. The one exception is `InferenceClient.predict`, whose answer is
mostly tensors: it returns a `Prediction` with them decoded to numpy
arrays. A failed call raises grpc.RpcError with the server's status code
and message.

How a client connects, `Connection`, comes from the environment unless
given: TLS from TANDEM_TLS_CA, TANDEM_TLS_CLIENT_CERT/KEY and TANDEM_TLS
(shared/security/tls.py), and a bearer token from TANDEM_TOKEN or TANDEM_TOKEN_FILE,
sent as `authorization: Bearer TOKEN` metadata with every call:

    connection = Connection(ClientTLS(ca=Path("ca.pem")), token=read_token_file("alice.token"))
    with TrainerClient("trainer.example:50051", connection=connection) as trainer:
        ...
"""

from __future__ import annotations

import collections
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.env import env
from shared.rpc.stubs import tandem_common_pb2, tandem_inference_pb2_grpc, tandem_trainer_pb2_grpc
from shared.rpc.stubs import tandem_inference_pb2 as inference_pb
from shared.rpc.stubs import tandem_trainer_pb2 as pb
from shared.rpc.convert import from_tensor, job_state_value, to_tensor
from shared.security.tls import ClientTLS, channel as tls_channel

TRAINER_SERVICE = pb.DESCRIPTOR.services_by_name["Trainer"].full_name
INFERENCE_SERVICE = inference_pb.DESCRIPTOR.services_by_name["Inference"].full_name


# ---------------------------------------------------------------- connecting


def read_token_file(path: str | Path) -> str:
    """The bearer token in a file (surrounding whitespace stripped); never echoed in an error."""
    token = Path(path).read_text(encoding="ascii", errors="replace").strip()
    if not token:
        raise ValueError(f"{path}: the token file is empty")
    if not all("!" <= character <= "~" for character in token):
        raise ValueError(f"{path}: a token is printable ASCII without spaces; this file holds more")
    return token


def token_from_env() -> str | None:
    """TANDEM_TOKEN, or the token in the file TANDEM_TOKEN_FILE names; None without either."""
    token, token_file = env("TANDEM_TOKEN", None), env("TANDEM_TOKEN_FILE", None)
    if token is not None and token_file is not None:
        raise ValueError("set TANDEM_TOKEN or TANDEM_TOKEN_FILE, not both")
    if token_file is not None:
        try:
            return read_token_file(token_file)
        except (OSError, ValueError) as error:
            reason = error.strerror if isinstance(error, OSError) else error
            raise ValueError(f"TANDEM_TOKEN_FILE={token_file!r}: {reason}") from None
    return token


@dataclass(frozen=True)
class Connection:
    """How a client reaches a server: TLS (None: plaintext) and the bearer token sent with every
    call (None: none). `Connection()` is plaintext without a token."""

    tls: ClientTLS | None = None
    token: str | None = field(default=None, repr=False)   # a secret: never in a repr or a log

    @classmethod
    def from_env(cls) -> "Connection":
        return cls(ClientTLS.from_env(), token_from_env())

    def channel(self, target: str, options: list | None = None) -> grpc.Channel:
        channel = tls_channel(target, self.tls, options)
        if self.token is None:
            return channel
        return grpc.intercept_channel(channel, BearerToken(self.token))


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                         "compression")), grpc.ClientCallDetails):
    pass


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer TOKEN` to every call's metadata.

    An interceptor rather than grpc's call credentials: those refuse to
    travel on a plaintext channel, and a token must work on both (on
    127.0.0.1 TLS is optional).
    """

    def __init__(self, token: str):
        self._metadata = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:
        return "BearerToken(...)"

    def _with_token(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(details.method, details.timeout,
                            [*(details.metadata or ()), self._metadata], details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    intercept_stream_stream = intercept_stream_unary


# ---------------------------------------------------------------- the clients


class _ServiceClient:
    """A channel to one server of `service`; `timeout` bounds each unary call. `connection`:
    TLS and token (default: from the environment, Connection.from_env)."""

    service: str  # the full service name that grpc.health.v1 reports on

    def __init__(self, target: str, timeout: float = 30.0, connection: Connection | None = None,
                 options: list | None = None):
        self.target = target
        self.timeout = timeout
        if connection is None:
            connection = Connection.from_env()
        self._channel = connection.channel(target, options)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls still in progress (a watch) are cancelled."""
        self._channel.close()

    def wait_until_ready(self, timeout: float) -> None:
        """Wait until the server reports SERVING for its service on grpc.health.v1.

        Follows the health status as a stream (no polling), waiting for the
        server to come up if it is not there yet; raises grpc.RpcError
        (DEADLINE_EXCEEDED) if it is not serving within `timeout` seconds. A
        trainer serves once started; an inference server once every model it
        is configured with serves (with none configured, once any model does).
        """
        wait_until_serving(self._health, self.service, timeout)


class TrainerClient(_ServiceClient):
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
        settings = {name: value for name, value in (hyperparameters or {}).items()
                    if value is not None}
        request = pb.StartJobRequest(
            model_name=model_name, dataset=dataset, hidden=hidden,
            hyperparameters=pb.Hyperparameters(**settings),
            checkpoints=pb.CheckpointSchedule(every_steps=every_steps, every_epoch=every_epoch),
            resume_from_version=resume_from_version, request_id=request_id)
        if preset is not None:
            request.preset = preset
        if spec is not None:
            request.spec_json = json.dumps(spec)
        return self._trainer.StartJob(request, timeout=self.timeout)

    def get_job(self, job_id: str) -> pb.Job:
        return self._trainer.GetJob(pb.GetJobRequest(job_id=job_id), timeout=self.timeout)

    def list_jobs(self, states: Iterable[str] = (), model_name: str = "",
                  page_size: int = 0) -> list[pb.Job]:
        """Every job (newest first) in one of `states` (short names: shared.rpc.convert.JOB_STATE_NAMES),
        following the pages to the last."""
        request = pb.ListJobsRequest(states=[job_state_value(name) for name in states],
                                     model_name=model_name, page_size=page_size)
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
            pb.ListCheckpointsRequest(model_name=model_name), timeout=self.timeout)
        return list(response.checkpoints)

    def list_datasets(self) -> list[pb.DatasetInfo]:
        response = self._trainer.ListDatasets(pb.ListDatasetsRequest(), timeout=self.timeout)
        return list(response.datasets)

    def upload_dataset(self, name: str, arrays: dict[str, np.ndarray], overwrite: bool = False,
                       piece_bytes: int = 1 << 20) -> pb.DatasetInfo:
        """Upload arrays x_train, y_train, x_test, y_test (or x, y) as dataset `name`.

        Sends a header declaring each array's dtype, shape, byte count and
        SHA-256, then each array's bytes (row-major, little-endian) in pieces
        of at most `piece_bytes`. Returns the dataset as the trainer loaded it.
        """
        tensors = {array_name: to_tensor(array) for array_name, array in arrays.items()}
        header = pb.UploadDatasetHeader(name=name, overwrite=overwrite, arrays=[
            pb.DatasetArrayHeader(name=array_name, dtype=tensor.dtype, shape=tensor.shape,
                                  size_bytes=len(tensor.data),
                                  sha256=hashlib.sha256(tensor.data).hexdigest())
            for array_name, tensor in tensors.items()])

        def chunks() -> Iterator[pb.UploadDatasetChunk]:
            yield pb.UploadDatasetChunk(header=header)
            for array_name, tensor in tensors.items():
                for offset in range(0, len(tensor.data), piece_bytes):
                    yield pb.UploadDatasetChunk(piece=pb.DatasetArrayPiece(
                        array=array_name, offset=offset,
                        data=tensor.data[offset:offset + piece_bytes]))

        return self._trainer.UploadDataset(chunks(), timeout=self.timeout)


# ---------------------------------------------------------------- inference


@dataclass(frozen=True)
class Prediction:
    """A PredictResponse with its tensors decoded to numpy arrays.

    `probabilities` is read-only (it shares the response's bytes);
    np.array(prediction.probabilities) makes a writable copy.
    """

    model_name: str
    version: int                    # the version that computed every row
    probabilities: np.ndarray       # float32 [N, classes]; rows sum to 1
    classes: np.ndarray             # int64 [N]: each row's most probable class
    top_k_classes: np.ndarray       # int64 [N, k], most probable first; k = 0 without top_k
    top_k_probabilities: np.ndarray  # float32 [N, k], in the same order


class InferenceClient(_ServiceClient):
    """A channel to one inference server; `timeout` bounds each call."""

    service = INFERENCE_SERVICE

    def __init__(self, target: str, timeout: float = 30.0, connection: Connection | None = None):
        # The server bounds what it sends (INFER_MAX_MESSAGE_BYTES); gRPC's own 4 MiB default
        # would refuse a large batch's probabilities here after the server computed them.
        super().__init__(target, timeout, connection,
                         options=[("grpc.max_receive_message_length", -1)])
        self._inference = tandem_inference_pb2_grpc.InferenceStub(self._channel)

    def predict(self, model_name: str, inputs: np.ndarray, version: int | None = None,
                top_k: int = 0) -> Prediction:
        """Class probabilities for the samples `inputs`, [N, *input_shape] (or flat [N, features]).

        float32 and float64 travel as they are (the server converts them to
        the model's dtype); any other dtype is refused. `version` asks for
        one loaded version rather than the one the server's policy serves;
        `top_k` > 0 also ranks each row's k most probable classes.
        """
        response = self._inference.Predict(inference_pb.PredictRequest(
            model_name=model_name, version=version, inputs=to_tensor(inputs), top_k=top_k),
            timeout=self.timeout)
        probabilities = from_tensor(response.probabilities, allowed_dtypes=("float32",),
                                    field="probabilities")
        rows = len(response.classes)
        return Prediction(
            model_name=response.model_name, version=response.version,
            probabilities=probabilities,
            classes=np.array(response.classes, dtype=np.int64),
            top_k_classes=np.array([row.classes for row in response.top_k],
                                   dtype=np.int64).reshape(rows, top_k),
            top_k_probabilities=np.array([row.probabilities for row in response.top_k],
                                         dtype=np.float32).reshape(rows, top_k))

    def model_metadata(self, model_name: str,
                       version: int | None = None) -> inference_pb.ModelMetadata:
        """What the model expects (input shape, classes, dtype) and which version answers."""
        return self._inference.GetModelMetadata(
            inference_pb.GetModelMetadataRequest(model_name=model_name, version=version),
            timeout=self.timeout)

    def list_models(self) -> list[inference_pb.ModelMetadata]:
        """Every model the server has loaded, by name, each as its served version."""
        response = self._inference.ListModels(inference_pb.ListModelsRequest(),
                                              timeout=self.timeout)
        return list(response.models)


def wait_until_serving(health: health_pb2_grpc.HealthStub, service: str, timeout: float) -> None:
    """Follow `service`'s health status until SERVING; DEADLINE_EXCEEDED after `timeout` seconds."""
    statuses = health.Watch(health_pb2.HealthCheckRequest(service=service),
                            timeout=timeout, wait_for_ready=True)
    try:
        for status in statuses:
            if status.status == health_pb2.HealthCheckResponse.SERVING:
                return
    finally:
        statuses.cancel()
