"""INFER_WORKERS: `python -m infer_svc` as a supervisor of server processes sharing one port.

Each test runs the real command in a subprocess against the test's own Redis,
and talks to it over gRPC and its /metrics endpoint on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests

from bench.service_process import child_processes
from infer_svc.config import InferConfig
from shared.embedded.redis_server import free_loopback_port
from shared.rpc.convert import to_tensor
from shared.rpc.stubs import tandem_inference_pb2 as pb
from shared.rpc.stubs import tandem_inference_pb2_grpc
from tests.helpers import scrape_metrics, wait_until
from tests.inference_harness import NAME, assert_close, core_probabilities, probabilities, publish, samples

WORKERS = 2
START_TIMEOUT = 60.0  # seconds for the workers to start and load the model
CALLS = 16  # Predicts, each on a connection of its own: the kernel spreads connections over workers


def worker_processes(pid: int) -> set[int]:
    """The pids of the worker processes the supervisor `pid` spawned (multiprocessing's
    spawn_main; not its resource tracker)."""
    found = set()
    for child in child_processes(pid):
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.add(child)
        except OSError:  # the process ended while we looked
            continue
    return found


class Replica:
    """`python -m infer_svc` with INFER_WORKERS workers, started and waited for; killed at close."""

    def __init__(self, redis_url: str, log: Path, workers: int = WORKERS, **settings: str):
        self.port, self.metrics_port, self.http_port = (free_loopback_port() for _ in range(3))
        environment = {
            **os.environ,
            "REDIS_URL": redis_url,
            "INFER_LISTEN": f"127.0.0.1:{self.port}",
            "INFER_HTTP_LISTEN": f"127.0.0.1:{self.http_port}",
            "INFER_METRICS_PORT": str(self.metrics_port),
            "INFER_MODELS": NAME,
            "INFER_WORKERS": str(workers),
            "INFER_POLL_SECONDS": "0.2",
            "INFER_GRACE_SECONDS": "1",
            **settings,
        }
        self.log = log
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "infer_svc"], env=environment, stdout=output, stderr=subprocess.STDOUT
            )
        wait_until(lambda: self._started(workers), f"{workers} workers to start", START_TIMEOUT)

    def _started(self, workers: int) -> bool:
        if self.process.poll() is not None:
            pytest.fail(f"the supervisor exited with {self.process.returncode}:\n{self.log.read_text()}")
        return "event=infer_workers_started" in self.log.read_text() and len(self.workers()) == workers

    def workers(self) -> set[int]:
        return worker_processes(self.process.pid)

    def metric(self, name: str, **labels: str) -> float:
        return scrape_metrics(self.metrics_port).get((name, tuple(sorted(labels.items()))), 0.0)

    def predict_on_new_connections(self, x: np.ndarray, count: int) -> list[pb.PredictResponse]:
        """`count` Predicts of `x`, each on a channel (a TCP connection) of its own."""
        answers = []
        for _ in range(count):
            with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
                stub = tandem_inference_pb2_grpc.InferenceStub(channel)
                request = pb.PredictRequest(model_name=NAME, inputs=to_tensor(x))
                answers.append(stub.Predict(request, timeout=10, wait_for_ready=True))
        return answers

    def close(self) -> None:
        if self.process.poll() is None:
            for pid in self.workers():
                os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture
def replica_and_model(private_redis, checkpoints, tmp_path):
    """A replica of WORKERS workers serving version 1 of NAME, and that version's model."""
    _, model = publish(checkpoints, seed=0)
    started = Replica(private_redis.url, tmp_path / "infer.log")
    yield started, model
    started.close()


@pytest.fixture
def replica(replica_and_model):
    return replica_and_model[0]


def test_the_workers_share_the_port_and_their_metrics_add_up(replica_and_model):
    replica, model = replica_and_model
    x = samples(3)
    answers = replica.predict_on_new_connections(x, CALLS)

    for answer in answers:
        assert answer.version == 1
        assert_close(probabilities(answer), core_probabilities(model, x))
    answered = replica.metric(
        "tandem_infer_requests_total", protocol="grpc", method="Predict", model=NAME, version="1", status="OK"
    )
    assert answered == CALLS, "the supervisor's /metrics does not add up its workers' counts"
    assert replica.metric("tandem_infer_model_loads_total", model=NAME) == WORKERS  # each loaded it
    assert replica.metric("tandem_infer_model_version", model=NAME) == 1


def test_the_workers_share_the_http_port_too(replica_and_model):
    replica, model = replica_and_model
    x = samples(2)
    request = {
        "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]
    }
    url = f"http://127.0.0.1:{replica.http_port}"

    answers = [requests.post(f"{url}/v2/models/{NAME}/infer", json=request, timeout=10) for _ in range(CALLS)]

    assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    for answer in answers:  # each a connection of its own (requests.post makes a new session)
        assert answer.status_code == 200, answer.text
        got = np.array(answer.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 10)
        assert_close(got, core_probabilities(model, x))
    answered = replica.metric(
        "tandem_infer_requests_total",
        protocol="http",
        method="ModelInfer",
        model=NAME,
        version="1",
        status="OK",
    )
    assert answered == CALLS


def test_every_worker_reloads_a_new_version(replica, checkpoints):
    publish(checkpoints, seed=1)

    def all_serve_version_2() -> bool:
        return {a.version for a in replica.predict_on_new_connections(samples(1), CALLS)} == {2}

    wait_until(all_serve_version_2, "every worker to serve version 2", timeout=20)
    assert replica.metric("tandem_infer_model_loads_total", model=NAME) == 2 * WORKERS


def test_a_killed_worker_is_started_again_and_the_port_keeps_answering(replica):
    first = replica.workers()
    victim = min(first)
    os.kill(victim, signal.SIGKILL)

    wait_until(
        lambda: len(replica.workers()) == WORKERS and victim not in replica.workers(),
        "the supervisor to start a worker in the killed one's place",
        START_TIMEOUT,
    )
    wait_until(lambda: replica.log.read_text().count("event=infer_worker_started") == WORKERS + 1, "it")
    assert f"event=infer_worker_died worker={sorted(first).index(victim)} pid={victim} exitcode=-9" in (
        replica.log.read_text()
    )
    answers = replica.predict_on_new_connections(samples(1), CALLS)
    assert {a.version for a in answers} == {1}
    assert replica.process.poll() is None


def test_sigterm_stops_every_worker_and_the_supervisor_cleanly(replica):
    workers = replica.workers()
    replica.process.send_signal(signal.SIGTERM)

    assert replica.process.wait(timeout=30) == 0
    log = replica.log.read_text()
    assert log.count("event=infer_stopped") == WORKERS
    assert "event=infer_workers_stopped workers=2" in log
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_workers_stop_when_their_supervisor_is_killed(replica):
    workers = replica.workers()
    replica.process.kill()  # SIGKILL: the supervisor cannot pass anything on
    replica.process.wait(timeout=10)

    wait_until(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers),
        "the orphaned workers to stop (they would hold the port)",
        timeout=30,
    )


def test_a_taken_metrics_port_stops_the_start_before_any_worker(private_redis, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        environment = {
            **os.environ,
            "REDIS_URL": private_redis.url,
            "INFER_LISTEN": "127.0.0.1:0",
            "INFER_HTTP_LISTEN": "127.0.0.1:0",
            "INFER_METRICS_PORT": str(taken.getsockname()[1]),
            "INFER_WORKERS": str(WORKERS),
        }
        ended = subprocess.run(
            [sys.executable, "-m", "infer_svc"], env=environment, capture_output=True, timeout=60, check=False
        )

    assert ended.returncode != 0
    assert b"Address already in use" in ended.stderr
    assert b"event=infer_worker_started" not in ended.stderr


@pytest.mark.parametrize("raw", ["0", "-1", "two", "257", "1.5"])
def test_a_worker_count_that_is_not_1_to_256_is_refused(monkeypatch, raw):
    monkeypatch.setenv("INFER_WORKERS", raw)
    with pytest.raises(ValueError, match=rf"INFER_WORKERS='{raw}': expected a number of worker processes"):
        InferConfig()


def test_workers_need_a_tcp_port(monkeypatch):
    monkeypatch.setenv("INFER_WORKERS", "2")
    monkeypatch.setenv("INFER_LISTEN", "unix:/tmp/tandem-infer.sock")
    with pytest.raises(ValueError, match="worker processes share a TCP port"):
        InferConfig()
    monkeypatch.setenv("INFER_WORKERS", "")  # the default: one per core, but one on a unix socket
    assert InferConfig().worker_processes == 1
