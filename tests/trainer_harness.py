"""What the trainer service's tests share: a trainer started in-process on a Redis of the
test's own, with a channel whose every call has a deadline, and the requests and waits
the tests make (the fixtures that start trainers are in conftest.py).

Every trainer gets a Redis of its own (an embedded server, started empty), whether
or not REDIS_URL is set: the trainer keeps its job records under the fixed prefix
"tandem" and resumes the unfinished jobs it finds there, so it must never share a
Redis with other tests or with a user's data.
"""

from __future__ import annotations

import collections
import hashlib
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.checkpoints.redis_client import connect
from shared.checkpoints.store import CheckpointStore
from shared.data import load_dataset
from shared.embedded.redis_server import EmbeddedRedis
from shared.rpc.stubs import tandem_trainer_pb2 as pb
from shared.rpc.stubs import tandem_trainer_pb2_grpc as pb_grpc
from tests.helpers import wait_until
from trainer_svc.config import TrainerConfig
from trainer_svc.job_repository import JobRepository
from trainer_svc.jobs import JobRecord
from trainer_svc.limits import JobLimits
from trainer_svc.server import TrainerServer

REPO = Path(__file__).resolve().parents[1]
GRACE = 10.0
CALL_DEADLINE = 60.0  # for every gRPC call that does not set its own


def trainer_config(redis_url: str, data_dir: Path, **settings) -> TrainerConfig:
    """Every setting explicit, so that TRAINER_* variables in the environment change nothing."""
    return TrainerConfig(
        **{
            "redis_url": redis_url,
            "listen": "127.0.0.1:0",
            "data_dir": str(data_dir),
            "max_concurrent_jobs": 1,
            "grace_seconds": GRACE,
            "metrics_port": 0,
            "metrics_address": "127.0.0.1",
            "resume_interrupted": True,
            "max_restarts": 3,
            "publish_outage_seconds": 60.0,
            "checkpoint_retention": 5,
            "max_upload_bytes": 512 * 2**20,
            "max_classes": 10_000,
            "grpc_workers": 16,
            "job_limits": JobLimits(),
            "lease_ms": 10_000,
            "lease_renew_ms": 3_000,
            "takeover_scan_ms": 5_000,
            "queue_poll_ms": 20,
            **settings,
        }
    )


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class DefaultDeadline(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Give every call without a deadline one, so that no test can wait on the server forever."""

    def _bounded(self, details):
        if details.timeout is not None:
            return details
        return _CallDetails(
            details.method,
            CALL_DEADLINE,
            details.metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._bounded(details), request)

    intercept_unary_stream = intercept_unary_unary
    intercept_stream_unary = intercept_unary_unary
    intercept_stream_stream = intercept_unary_unary


def bounded_channel(port: int) -> grpc.Channel:
    return grpc.intercept_channel(grpc.insecure_channel(f"127.0.0.1:{port}"), DefaultDeadline())


class Trainer:
    """A trainer running in this process, a channel to it, and direct access to its Redis."""

    def __init__(self, redis_server: EmbeddedRedis, config: TrainerConfig):
        self.redis = redis_server
        self.server = TrainerServer(config).start()
        self.channel = bounded_channel(self.server.port)
        self.stub = pb_grpc.TrainerStub(self.channel)
        self.client = connect(redis_server.url)
        self.store = CheckpointStore(self.client)
        self.jobs = JobRepository(self.client)
        self._closed = False

    @property
    def manager(self):
        return self.server.manager

    def close(self, grace: float = GRACE) -> None:
        if self._closed:
            return
        self._closed = True
        self.channel.close()
        self.server.stop(grace)
        self.client.close()


def mlp_job(
    model_name: str,
    *,
    epochs: int = 2,
    batch_size: int = 32,
    hidden=(16,),
    every_steps: int = 0,
    every_epoch: bool = False,
    dataset: str = "digits",
    request_id: str = "",
    **hyperparameters,
) -> pb.StartJobRequest:
    """A small MLP job (seed 0 unless given)."""
    hyperparameters.setdefault("seed", 0)
    return pb.StartJobRequest(
        model_name=model_name,
        preset="mlp",
        hidden=hidden,
        dataset=dataset,
        hyperparameters=pb.Hyperparameters(epochs=epochs, batch_size=batch_size, **hyperparameters),
        checkpoints=pb.CheckpointSchedule(every_steps=every_steps, every_epoch=every_epoch),
        request_id=request_id,
    )


def slow_job(model_name: str, **settings) -> pb.StartJobRequest:
    """One sample per step, 50 epochs: about 80,000 steps, so it runs until it is stopped."""
    return mlp_job(model_name, epochs=50, batch_size=1, **settings)


def get_job(stub, job_id: str) -> pb.Job:
    return stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=10)


def rpc_error(call, request, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(request, timeout=30, **kwargs)
    return caught.value


def watch(stub, job_id: str, timeout: float = 60) -> list[pb.JobEvent]:
    return list(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout))


def kinds(events: list[pb.JobEvent]) -> list[str | None]:  # None: an event with none set
    return [event.WhichOneof("event") for event in events]


def all_jobs(stub, **request) -> list[pb.Job]:
    jobs, token = [], ""
    while True:
        page = stub.ListJobs(pb.ListJobsRequest(page_token=token, **request), timeout=10)
        jobs += page.jobs
        if not (token := page.next_page_token):
            return jobs


def saved_record(jobs: JobRepository, job_id: str) -> JobRecord:
    """The job's record as saved in Redis, which the test expects to be there and readable."""
    record = jobs.get(job_id)
    assert record is not None, f"no readable record of job {job_id}"
    return record


def list_checkpoints(stub, model_name: str):
    return stub.ListCheckpoints(pb.ListCheckpointsRequest(model_name=model_name), timeout=10).checkpoints


# ---------------------------------------------------------------- datasets


def digits_arrays(train_size: int, test_size: int) -> dict[str, np.ndarray]:
    digits = load_dataset("digits")
    return {
        "x_train": digits.x_train[:train_size],
        "y_train": digits.y_train[:train_size],
        "x_test": digits.x_test[:test_size],
        "y_test": digits.y_test[:test_size],
    }


def upload(
    name: str,
    arrays: dict[str, np.ndarray],
    *,
    overwrite: bool = False,
    piece: int = 16384,
    drop_last_piece_of: str | None = None,
):
    """The chunks of an upload: the header, then each array's little-endian bytes in pieces."""
    data = {
        array: np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()
        for array, values in arrays.items()
    }
    yield pb.UploadDatasetChunk(
        header=pb.UploadDatasetHeader(
            name=name,
            overwrite=overwrite,
            arrays=[
                pb.DatasetArrayHeader(
                    name=array,
                    dtype=values.dtype.name,
                    shape=values.shape,
                    size_bytes=len(data[array]),
                    sha256=hashlib.sha256(data[array]).hexdigest(),
                )
                for array, values in arrays.items()
            ],
        )
    )
    for array, raw in data.items():
        offsets = list(range(0, len(raw), piece))
        if array == drop_last_piece_of:
            offsets = offsets[:-1]
        for offset in offsets:
            yield pb.UploadDatasetChunk(
                piece=pb.DatasetArrayPiece(array=array, offset=offset, data=raw[offset : offset + piece])
            )


# ---------------------------------------------------------------- trainer processes


def trainer_env(
    redis_url: str, port: int, data_dir: Path, metrics_port: int = 0, extra_env: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of a `python -m trainer_svc`: this one's without any TRAINER_, TANDEM_ or
    REDIS_ variable, and the settings given (port 0: a free one)."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("TRAINER_", "TANDEM_", "REDIS_"))
    }
    env.update(
        REDIS_URL=redis_url,
        TRAINER_LISTEN=f"127.0.0.1:{port}",
        TRAINER_METRICS_PORT=str(metrics_port),
        TRAINER_GRACE_SECONDS=str(GRACE),
        TANDEM_DATA_DIR=str(data_dir),
        PYTHONUNBUFFERED="1",
        **(extra_env or {}),
    )
    return env


def start_trainer_process(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`python -m trainer_svc` from the checkout, with `env` only, its output added to `log_path`."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "trainer_svc"],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@contextmanager
def trainer_process(
    redis_url: str,
    port: int,
    log_path: Path,
    data_dir: Path,
    metrics_port: int = 0,
    extra_env: dict[str, str] | None = None,
):
    """`python -m trainer_svc` configured by environment variables, serving once this yields.

    `extra_env` are more of them (TRAINER_LEASE_MS="2000", ...).
    """
    process = start_trainer_process(trainer_env(redis_url, port, data_dir, metrics_port, extra_env), log_path)
    try:
        with bounded_channel(port) as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving():
                assert process.poll() is None, (
                    f"the trainer exited with {process.returncode}:\n{log_tail(log_path)}"
                )
                try:
                    reply = health.Check(
                        health_pb2.HealthCheckRequest(service="tandem.v1.Trainer"), timeout=1
                    )
                except grpc.RpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            wait_until(serving, "the trainer process to serve", timeout=60)
            yield process, pb_grpc.TrainerStub(channel)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def terminate(process, log_path: Path) -> float:
    """SIGTERM; the process must exit 0 within the grace period. Returns the seconds it took."""
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=GRACE)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"no exit within {GRACE} s of SIGTERM:\n{log_tail(log_path)}") from None
    assert code == 0, log_tail(log_path)
    return time.monotonic() - sent
