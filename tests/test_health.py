"""grpc.health.v1 (shared.rpc.health): what Check and Watch answer, the cap on open
watches, and a cancel storm that must leave both real servers answering and
stopping cleanly on SIGTERM (issue 10: grpcio's own servicer deadlocked there).

The first tests talk to a small gRPC server on 127.0.0.1 that serves only the
health servicer; the storm runs `python -m trainer_svc` and `python -m
infer_svc` as processes, each on an embedded Redis of its own.
"""

from __future__ import annotations

import collections
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.embedded.redis_server import free_loopback_port
from shared.rpc.health import HealthServicer
from shared.rpc.stubs import (
    tandem_inference_pb2,
    tandem_inference_pb2_grpc,
    tandem_trainer_pb2,
    tandem_trainer_pb2_grpc,
)
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 10.0  # seconds for every call and every wait
GRACE = 10.0  # the servers' shutdown grace in the storm test
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
STATUSES = (SERVING, NOT_SERVING, SERVICE_UNKNOWN)


def check(health, service: str):
    return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE).status


def watch(health, service: str):
    return health.Watch(health_pb2.HealthCheckRequest(service=service), timeout=DEADLINE)


def next_status(stream):
    return next(stream).status


# ---------------------------------------------------------------- the servicer alone

MAX_WATCHERS = 2


@pytest.fixture
def served():
    """Our servicer (2 watches at most) on a gRPC server of 8 threads, and a stub to it."""
    servicer = HealthServicer(MAX_WATCHERS, "TEST_MAX_WATCHERS")
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield servicer, health_pb2_grpc.HealthStub(channel)
    finally:
        channel.close()
        server.stop(None)


def test_check_answers_the_status_and_not_found_for_an_unknown_service(served):
    servicer, health = served
    servicer.set("", SERVING)
    servicer.set("tandem.v1.Thing", NOT_SERVING)
    assert check(health, "") == SERVING
    assert check(health, "tandem.v1.Thing") == NOT_SERVING

    with pytest.raises(grpc.RpcError) as caught:
        check(health, "tandem.v1.Nothing")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "HealthCheckRequest.service 'tandem.v1.Nothing'" in caught.value.details()

    with pytest.raises(grpc.RpcError) as caught:  # quoted in part: the trailers keep their size
        check(health, "x" * 100_000)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_watch_sends_the_current_status_then_each_change(served):
    servicer, health = served
    stream = watch(health, "a")
    try:
        assert next_status(stream) == SERVICE_UNKNOWN  # unknown, and the call stays open
        servicer.set("a", SERVING)
        assert next_status(stream) == SERVING
        servicer.set("a", NOT_SERVING)
        assert next_status(stream) == NOT_SERVING
        servicer.set("a", NOT_SERVING)  # no change: nothing is sent
        servicer.set("a", SERVING)
        assert next_status(stream) == SERVING
    finally:
        stream.cancel()


def test_a_graceful_shutdown_ends_every_watch_with_not_serving_for_good(served):
    servicer, health = served
    servicer.set("a", SERVING)
    stream = watch(health, "a")
    assert next_status(stream) == SERVING

    servicer.enter_graceful_shutdown()
    assert next_status(stream) == NOT_SERVING
    with pytest.raises(StopIteration):
        next(stream)
    assert stream.code() == grpc.StatusCode.OK

    servicer.set("a", SERVING)  # ignored from now on
    assert check(health, "a") == NOT_SERVING
    assert [reply.status for reply in watch(health, "a")] == [NOT_SERVING]


def open_watch(health):
    """A Watch on "" and the first thing it gives: a status, or the code that refuses it."""
    stream = watch(health, "")
    try:
        return stream, next_status(stream)
    except grpc.RpcError as error:
        return stream, error.code()


def test_watches_beyond_the_limit_are_refused_and_a_cancelled_one_frees_its_place(served):
    servicer, health = served
    servicer.set("", SERVING)
    streams = []
    try:
        for _ in range(MAX_WATCHERS):
            stream, first = open_watch(health)
            streams.append(stream)
            assert first == SERVING
        refused, first = open_watch(health)
        assert first == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the limit is 2 (set by TEST_MAX_WATCHERS)" in refused.details()
        assert check(health, "") == SERVING  # the other calls still have threads

        streams.pop().cancel()

        def admitted():
            stream, first = open_watch(health)
            return stream if first == SERVING else None

        streams.append(wait_until(admitted, "the cancelled watch's place to be free again"))
        assert open_watch(health)[1] == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        for stream in streams:
            stream.cancel()


# ---------------------------------------------------------------- a cancel storm against both servers


@dataclass(frozen=True)
class Server:
    module: str
    settings: Callable[[str, int, Path], dict[str, str]]  # (Redis URL, port, tmp dir) -> environment
    statuses: dict[str, int]  # what Check answers, by service, while idle
    call: Callable[[grpc.Channel], object]  # one of its own RPCs, which must answer


SERVERS = {
    "trainer": Server(
        "trainer_svc",
        lambda redis_url, port, tmp: {
            "REDIS_URL": redis_url,
            "TRAINER_LISTEN": f"127.0.0.1:{port}",
            "TRAINER_METRICS_PORT": "0",
            "TRAINER_GRACE_SECONDS": str(GRACE),
            "TRAINER_GRPC_WORKERS": "32",
            "TANDEM_DATA_DIR": str(tmp / "data"),
        },
        {"": SERVING, "tandem.v1.Trainer": SERVING},
        lambda channel: tandem_trainer_pb2_grpc.TrainerStub(channel).ListDatasets(
            tandem_trainer_pb2.ListDatasetsRequest(), timeout=DEADLINE
        ),
    ),
    "infer": Server(  # no model in its Redis: it answers, and is not ready
        "infer_svc",
        lambda redis_url, port, tmp: {
            "REDIS_URL": redis_url,
            "INFER_LISTEN": f"127.0.0.1:{port}",
            "INFER_HTTP_LISTEN": "127.0.0.1:0",
            "INFER_METRICS_PORT": "0",
            "INFER_GRACE_SECONDS": str(GRACE),
            "INFER_GRPC_WORKERS": "32",
        },
        {"": NOT_SERVING, "tandem.v1.Inference": NOT_SERVING},
        lambda channel: tandem_inference_pb2_grpc.InferenceStub(channel).ListModels(
            tandem_inference_pb2.ListModelsRequest(), timeout=DEADLINE
        ),
    ),
}
STORM_CLIENTS, STORM_ROUNDS = 8, 5  # 8 = the servers' watch limit for 32 workers


@contextmanager
def server_process(server: Server, redis_url: str, tmp: Path):
    """`python -m <server>` on a free port, configured by environment only: yields it, the port, its log."""
    port, log_path = free_loopback_port(), tmp / f"{server.module}.log"
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("TRAINER_", "INFER_", "TANDEM_", "REDIS_"))
    }
    env.update(server.settings(redis_url, port, tmp), PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", server.module],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process, port, log_path
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=DEADLINE)


def log_tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def answers(health, service: str):
    try:
        return check(health, service)
    except grpc.RpcError:
        return None


def cancel_storm(port: int) -> collections.Counter:
    """STORM_CLIENTS clients, each STORM_ROUNDS times: Watch(""), read one message, cancel."""

    def client(_):
        outcomes = []
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(STORM_ROUNDS):
                stream, first = open_watch(health)
                stream.cancel()
                outcomes.append("a status" if first in STATUSES else first)
        return outcomes

    with ThreadPoolExecutor(STORM_CLIENTS) as pool:
        return collections.Counter(itertools.chain.from_iterable(pool.map(client, range(STORM_CLIENTS))))


@pytest.mark.parametrize("name", SERVERS)
def test_a_cancel_storm_of_watches_leaves_the_server_answering_and_stopping_on_sigterm(
    name, private_redis, tmp_path
):
    server = SERVERS[name]
    with (
        server_process(server, private_redis.url, tmp_path) as (process, port, log_path),
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)

        def started():
            assert process.poll() is None, (
                f"{server.module} exited with {process.returncode}:\n{log_tail(log_path)}"
            )
            return answers(health, "") == server.statuses[""]

        wait_until(started, f"{server.module} to answer health checks", timeout=60)

        outcomes = cancel_storm(port)
        # Each client gets the status, or is refused because the watch limit is reached.
        assert set(outcomes) <= {"a status", grpc.StatusCode.RESOURCE_EXHAUSTED}, outcomes
        assert outcomes["a status"] >= STORM_CLIENTS, outcomes

        for service, status in server.statuses.items():
            assert check(health, service) == status, service
        server.call(channel)

        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=GRACE + DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"{server.module} did not exit within {GRACE + DEADLINE} s of SIGTERM:\n{log_tail(log_path)}"
            )
        assert process.returncode == 0, log_tail(log_path)
