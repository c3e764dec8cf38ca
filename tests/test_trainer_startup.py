"""A trainer started before its Redis: it serves at once (live, not ready), refuses every call
with UNAVAILABLE saying why, and finishes starting when Redis comes (trainer_svc.redis_wait).

Redis is "down" as a closed port of 127.0.0.1 (free, nobody listening), and then "up" as an
embedded Redis started on that very port.
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.embedded.redis_server import EmbeddedRedis, free_loopback_port
from shared.rpc.health import LIVENESS
from shared.rpc.stubs import tandem_trainer_pb2 as pb
from shared.rpc.stubs import tandem_trainer_pb2_grpc as pb_grpc
from tests.helpers import wait_finished, wait_until
from tests.trainer_harness import (
    GRACE,
    REPO,
    bounded_channel,
    list_checkpoints,
    mlp_job,
    rpc_error,
    start_trainer_process,
    trainer_config,
    trainer_env,
)
from trainer_svc.server import SERVICE_NAME, TrainerServer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_status(channel: grpc.Channel, service: str):
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


@pytest.fixture
def closed_port() -> int:
    return free_loopback_port()


@pytest.fixture
def waiting_trainer(closed_port, tmp_path):
    """A trainer in this process whose Redis (127.0.0.1:closed_port) is not there yet."""
    server = TrainerServer(trainer_config(f"redis://127.0.0.1:{closed_port}/0", tmp_path / "data")).start()
    channel = bounded_channel(server.port)
    yield server, channel
    channel.close()
    server.stop(GRACE)


def test_a_trainer_without_redis_is_live_not_ready_and_refuses_calls_saying_why(waiting_trainer, closed_port):
    _, channel = waiting_trainer
    assert health_status(channel, LIVENESS) == SERVING
    assert health_status(channel, "") == NOT_SERVING
    assert health_status(channel, SERVICE_NAME) == NOT_SERVING
    stub = pb_grpc.TrainerStub(channel)
    calls = [
        (stub.StartJob, mlp_job("early", epochs=1)),
        (stub.ListJobs, pb.ListJobsRequest()),
        (stub.GetJob, pb.GetJobRequest(job_id="0123456789abcdef")),
        (stub.ListCheckpoints, pb.ListCheckpointsRequest(model_name="early")),
        (stub.ListDatasets, pb.ListDatasetsRequest()),
    ]
    for call, request in calls:
        error = rpc_error(call, request)
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        assert re.fullmatch(
            rf"the trainer is waiting for its Redis at redis://127\.0\.0\.1:{closed_port}/0 "
            r"\(unreachable since \d\d:\d\d:\d\d: .*Connection refused.*\); retrying",
            error.details(),
        ), error.details()
    with pytest.raises(grpc.RpcError) as caught:  # a stream is refused on its first message
        next(stub.WatchJob(pb.WatchJobRequest(job_id="0123456789abcdef"), timeout=10))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "waiting for its Redis" in caught.value.details()


def test_the_trainer_finishes_starting_when_its_redis_comes(waiting_trainer, closed_port, caplog):
    caplog.set_level(logging.INFO, logger="tandem.trainer")
    server, channel = waiting_trainer
    assert health_status(channel, "") == NOT_SERVING
    with EmbeddedRedis(tcp=True, port=closed_port):
        wait_until(lambda: health_status(channel, "") == SERVING, "the trainer to turn SERVING", timeout=30)
        # Reached on a retry (the first attempt failed before this test started Redis), with
        # one line for the outage and one for its end, however many attempts were made.
        records = caplog.get_records("setup") + caplog.get_records("call")
        events = [r.getMessage().split()[0] for r in records if "event=redis_" in r.getMessage()]
        assert events == ["event=redis_unavailable", "event=redis_connected"], events
        assert health_status(channel, SERVICE_NAME) == SERVING
        stub = pb_grpc.TrainerStub(channel)
        job = stub.StartJob(mlp_job("after-the-wait", epochs=1), timeout=30)
        finished = wait_finished(stub, job.job_id)
        assert finished.state == pb.JOB_STATE_SUCCEEDED, finished.error
        assert finished.last_published_version >= 1
        newest = list_checkpoints(stub, "after-the-wait")[0]
        assert newest.version == finished.last_published_version
        server.stop(GRACE)  # while its Redis is still there


def test_the_trainer_process_waits_for_redis_with_one_log_line_and_stops_on_sigterm(closed_port, tmp_path):
    log_path = tmp_path / "trainer.log"
    # A password in the URL, which no log line may show.
    env = trainer_env(f"redis://:hush-hush@127.0.0.1:{closed_port}/0", 0, tmp_path / "data")
    process = start_trainer_process(env, log_path)
    try:
        started = wait_until(
            lambda: re.search(r"event=trainer_started .* port=(\d+)", log_path.read_text()),
            "the trainer to log that it serves",
            timeout=60,
        )
        with bounded_channel(int(started.group(1))) as channel:
            assert health_status(channel, LIVENESS) == SERVING
            assert health_status(channel, "") == NOT_SERVING
            assert channel_refuses(channel)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=GRACE) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log_path.read_text()
    assert "Traceback" not in output and "hush-hush" not in output, output
    unavailable = [line for line in output.splitlines() if "event=redis_unavailable" in line]
    assert len(unavailable) == 1, output
    assert f"url=redis://127.0.0.1:{closed_port}/0 retrying every 0.5 s to 5 s" in unavailable[0]
    assert "event=trainer_stopped" in output


def channel_refuses(channel: grpc.Channel) -> bool:
    error = rpc_error(pb_grpc.TrainerStub(channel).ListJobs, pb.ListJobsRequest())
    return error.code() == grpc.StatusCode.UNAVAILABLE and "waiting for its Redis" in error.details()


@pytest.mark.parametrize("url", ["not-a-url", "http://127.0.0.1:6379/0"])
def test_a_redis_url_that_is_not_one_fails_the_start_in_one_line(url, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "trainer_svc"],
        cwd=REPO,
        env=trainer_env(url, 0, tmp_path / "data"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1 and "event=trainer_misconfigured error=REDIS_URL: " in lines[0], lines
