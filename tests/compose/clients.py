"""The compose tier's clients: what its tests drive a stack with, from this machine.

Each talks to the ports a stack publishes on 127.0.0.1 with the project's own
clients, over TLS with the stack's CA and tokens; every wait is bounded (a gRPC
deadline, or a deadline on a condition). Shared by tests/compose/test_stack.py
(docker-compose.yml) and tests/compose/test_ha_stack.py (with docker-compose.ha.yml).
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, Protocol, cast

import grpc
import numpy as np
import pytest

from shared.client import TrainerClient
from shared.data import load_dataset
from shared.rpc.convert import to_tensor
from shared.rpc.stubs import tandem_inference_pb2 as pb
from shared.rpc.stubs import tandem_inference_pb2_grpc, tandem_trainer_pb2
from tests.compose.metrics_text import predicts_answered
from tests.compose.stack import Stack

TRAIN_TIMEOUT = 240.0  # one job, start to end
READY_TIMEOUT = 90.0  # a (re)started service answering
RELOAD_TIMEOUT = 30.0  # a replica serving a newly published version
CALL_TIMEOUT = 30.0


def digits():
    return load_dataset("digits")


def deadline_loop(what: str, timeout: float, interval: float = 0.1):
    """Yield until the caller breaks out; fail once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        yield
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class _EventStream(Protocol):
    """What TrainerClient.watch returns at run time: a gRPC response stream, which can be cancelled."""

    def __iter__(self) -> Iterator[tandem_trainer_pb2.JobEvent]: ...

    def cancel(self) -> bool: ...


class JobWatch:
    """A trainer's WatchJob stream followed in a thread, each event with its arrival time.

    Bounded: the stream is cancelled after `timeout` seconds.
    """

    def __init__(self, client: TrainerClient, job_id: str, timeout: float = TRAIN_TIMEOUT):
        self.job_id = job_id
        self.events: list[tuple[float, tandem_trainer_pb2.JobEvent]] = []
        self.error: grpc.RpcError | None = None
        self.ended = False
        self._condition = threading.Condition()
        self._stream = cast(_EventStream, client.watch(job_id))
        self._timer = threading.Timer(timeout, self._stream.cancel)
        self._timer.daemon = True
        self._timer.start()
        threading.Thread(target=self._follow, name=f"watch-{job_id}", daemon=True).start()

    def _follow(self) -> None:
        try:
            for event in self._stream:
                with self._condition:
                    self.events.append((time.monotonic(), event))
                    self._condition.notify_all()
        except grpc.RpcError as error:
            self.error = error
        finally:
            self._timer.cancel()
            with self._condition:
                self.ended = True
                self._condition.notify_all()

    def wait_for(self, predicate: Callable, what: str, timeout: float = TRAIN_TIMEOUT):
        """The first event that satisfies `predicate`; fails if the stream ends or time runs out."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                for _, event in self.events:
                    if predicate(event):
                        return event
                if self.ended:
                    pytest.fail(f"job {self.job_id}: the watch ended ({self.error!r}) before {what}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"job {self.job_id}: no {what} within {timeout} s")
                self._condition.wait(remaining)

    def wait_ended(self, timeout: float) -> None:
        with self._condition:
            if not self._condition.wait_for(lambda: self.ended, timeout):
                pytest.fail(f"job {self.job_id}: the watch did not end within {timeout} s")

    def finished(self, timeout: float = TRAIN_TIMEOUT):
        return self.wait_for(lambda e: e.HasField("finished"), "end of the job", timeout).finished

    def of_kind(self, kind: str) -> list[tuple[float, Any]]:  # Any: the message of `kind` (getattr)
        with self._condition:
            return [(at, getattr(e, kind)) for at, e in self.events if e.WhichOneof("event") == kind]

    def close(self) -> None:
        self._stream.cancel()


class Inference:
    """A channel to one inference replica (or several, with `options`), Tandem's own API,
    over TLS with the stack's predict token."""

    def __init__(self, stack: Stack, target: str, options=()):
        self.channel = stack.connection("predict").channel(target, options=list(options))
        self.stub = tandem_inference_pb2_grpc.InferenceStub(self.channel)

    def predict(self, model: str, x: np.ndarray, timeout: float = CALL_TIMEOUT) -> pb.PredictResponse:
        return self.stub.Predict(pb.PredictRequest(model_name=model, inputs=to_tensor(x)), timeout=timeout)

    def close(self) -> None:
        self.channel.close()


class PredictLoop:
    """Predictions in a thread, round robin over `calls`, every outcome recorded with its time.

    Bounded: at most `max_seconds`; paced by `interval` so that it leaves the CPU to training.
    """

    def __init__(
        self,
        calls: list[Callable[[], pb.PredictResponse]],
        interval: float = 0.02,
        max_seconds: float = TRAIN_TIMEOUT + 60,
    ):  # outlives the job it watches
        self.calls, self.interval, self.max_seconds = calls, interval, max_seconds
        self.outcomes: list[tuple[float, bool, str]] = []  # (time, ok, version or error)
        self._stop = threading.Event()
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="predict-loop", daemon=True)

    def __enter__(self) -> PredictLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        index = 0
        while not self._stop.is_set() and time.monotonic() < deadline:
            call = self.calls[index % len(self.calls)]
            index += 1
            try:
                outcome = (True, str(call().version))
            except grpc.RpcError as error:
                outcome = (False, f"{error.code().name}: {error.details()}")
            with self._condition:
                self.outcomes.append((time.monotonic(), *outcome))
                self._condition.notify_all()
            self._stop.wait(self.interval)
        with self._condition:
            self._stop.set()
            self._condition.notify_all()

    def successes(self) -> int:
        with self._condition:
            return sum(ok for _, ok, _ in self.outcomes)

    def failures(self) -> list[tuple[float, bool, str]]:
        with self._condition:
            return [outcome for outcome in self.outcomes if not outcome[1]]

    def wait_successes(self, count: int, timeout: float = 60.0) -> None:
        with self._condition:
            if (
                not self._condition.wait_for(
                    lambda: self._stop.is_set() or sum(ok for _, ok, _ in self.outcomes) >= count, timeout
                )
                or sum(ok for _, ok, _ in self.outcomes) < count
            ):
                pytest.fail(
                    f"the client loop reached {self.successes()} of {count} answers "
                    f"(failures: {self.failures()[:5]})"
                )

    def between(self, start: float, end: float) -> list[tuple[float, bool, str]]:
        with self._condition:
            return [outcome for outcome in self.outcomes if start <= outcome[0] <= end]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=CALL_TIMEOUT + 5)


def redis_cli(stack: Stack, node: str, user: str, *command: str) -> str:
    """A command on data node `node` (its service name) as ACL user `user`, over TLS.

    The `sentinel` user's password is in the Sentinels' folder; the services' in their own.
    """
    folder = "sentinel" if user == "sentinel" else user
    password = (stack.secrets_dir / folder / "redis.password").read_text()
    _, output = stack.container(node).exec_run(
        [
            "redis-cli",
            "--tls",
            "--cacert",
            "/run/tandem/public/ca.crt",
            "-h",
            "localhost",
            "--user",
            user,
            "--pass",
            password,
            "--no-auth-warning",
            *command,
        ]
    )
    return output.decode(errors="replace").strip()


def connect_trainer(stack: Stack, replica: int = 1) -> TrainerClient:
    """A client of the stack's trainer (its `replica`-th, with several), once it answers."""
    address = stack.trainer_address(replica)
    client = TrainerClient(address, timeout=CALL_TIMEOUT, connection=stack.connection())
    client.wait_until_ready(READY_TIMEOUT)
    return client


def wait_until_serving(replica: Inference, model: str, version: int, sample: np.ndarray) -> None:
    """Until the replica answers `model` with `version` (hot reload), bounded."""
    for _ in deadline_loop(f"version {version} of {model} to serve", RELOAD_TIMEOUT):
        if replica.predict(model, sample).version == version:
            return


def requests_served(stack: Stack, container, model: str) -> float:
    """The replica's count of answered Predict requests for `model` (its Prometheus metrics)."""
    with urllib.request.urlopen(stack.infer_metrics_url(container), timeout=10) as response:
        return predicts_answered(response.read().decode(), model)


def crash(container, process: str) -> None:
    """SIGKILL the service's process inside the container, as a crash or the OOM killer would.

    Not `container.kill()`: Docker counts a kill through its API as a manual stop and
    then applies no restart policy, whereas a process that dies is restarted.
    """
    script = (
        "import os, signal\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        argv = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')\n"
        "    except OSError:\n"
        "        continue\n"
        f"    if argv[0].endswith(b'python') and {process.encode()!r} in argv and int(pid) != os.getpid():\n"
        "        os.kill(int(pid), signal.SIGKILL)\n"
        "        print('killed', pid)\n"
    )
    _, output = container.exec_run(["python", "-c", script])
    # Not its exit status: once the service's process is gone the container stops, and this
    # script may be killed with it before it exits.
    assert b"killed" in output, output.decode(errors="replace")
