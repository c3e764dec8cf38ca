"""`make services` (scripts/services.py): the trainer and the inference service as child processes
of one launcher, on an embedded Redis or the one REDIS_URL names, stopped together.

Each test runs the launcher as a process, every port it would use set to a free one of
127.0.0.1, its output in a file that the test reads.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.service_process import child_processes
from shared.client import InferenceClient, TrainerClient
from shared.data import load_dataset
from shared.embedded.redis_server import free_loopback_port
from shared.rpc.health import LIVENESS
from shared.rpc.stubs import tandem_trainer_pb2 as pb
from tests.helpers import FINISHED, wait_until
from tests.trainer_harness import REPO

LAUNCHER = REPO / "scripts" / "services.py"
BANNER = "Tandem is up; Ctrl-C stops it all."
START_TIMEOUT = 120.0  # seconds for the banner: two interpreters start, and load NumPy and gRPC
STOP_TIMEOUT = 60.0  # the trainer's grace (10 s here) and the launcher's margin, with room


class Launcher:
    """scripts/services.py running, with `env` and `args`; its output in `log`."""

    def __init__(self, env: dict[str, str], log: Path, *args: str):
        self.env, self.log = env, log
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, str(LAUNCHER), *args],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_banner(self) -> None:
        def shown() -> bool:
            assert self.process.poll() is None, f"the launcher exited:\n{self.output()}"
            return BANNER in self.output()

        wait_until(shown, "the launcher's banner", timeout=START_TIMEOUT)

    def stop(self, signum: int = signal.SIGINT) -> int:
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not exit within {STOP_TIMEOUT} s:\n{self.output()}")

    def children(self) -> dict[int, str]:
        """Its child processes: pid -> command line."""
        return {pid: command_line(pid) for pid in child_processes(self.process.pid)}


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:  # exited meanwhile
        return ""


def program(command: str) -> str:
    """Which of the launcher's programs a command line runs."""
    return next(name for name in ("trainer_svc", "infer_svc", "redis-server") if name in command)


def gone(pids) -> bool:
    return not any(Path(f"/proc/{pid}").exists() for pid in pids)


@pytest.fixture
def launcher_env(tmp_path) -> dict[str, str]:
    """This environment without Tandem's settings, every port a free one, the worktree importable."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("TRAINER_", "INFER_", "TANDEM_", "REDIS_"))
    }
    env.update(
        TRAINER_LISTEN=f"127.0.0.1:{free_loopback_port()}",
        TRAINER_METRICS_PORT=str(free_loopback_port()),
        TRAINER_GRACE_SECONDS="10",
        INFER_LISTEN=f"127.0.0.1:{free_loopback_port()}",
        INFER_METRICS_PORT=str(free_loopback_port()),
        INFER_HTTP_LISTEN=f"127.0.0.1:{free_loopback_port()}",  # for an inference service that serves HTTP
        INFER_WORKERS="1",
        TANDEM_DATA_DIR=str(tmp_path / "data"),
        PYTHONPATH=str(REPO),  # the script's directory is on its path, not the checkout
        PYTHONUNBUFFERED="1",
    )
    return env


@contextmanager
def launched(launcher_env, tmp_path, *args: str):
    launcher = Launcher(launcher_env, tmp_path / "launcher.log", *args)
    try:
        yield launcher
    finally:
        if launcher.process.poll() is None:
            launcher.process.kill()
            launcher.process.wait()


def health_status(address: str, service: str):
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def test_make_services_trains_and_serves_on_an_embedded_redis_and_stops_on_ctrl_c(launcher_env, tmp_path):
    redis_dir = tmp_path / "redis"
    trainer_address, infer_address = launcher_env["TRAINER_LISTEN"], launcher_env["INFER_LISTEN"]
    with launched(launcher_env, tmp_path, "--redis-dir", str(redis_dir)) as launcher:
        launcher.wait_for_banner()
        children = launcher.children()
        assert sorted(map(program, children.values())) == ["infer_svc", "redis-server", "trainer_svc"]
        assert health_status(trainer_address, "") == health_pb2.HealthCheckResponse.SERVING
        assert health_status(infer_address, LIVENESS) == health_pb2.HealthCheckResponse.SERVING

        with TrainerClient(trainer_address) as trainer:
            job = trainer.start_job(
                "services-digits",
                "digits",
                preset="mlp",
                hidden=[16],
                hyperparameters={"epochs": 1, "batch_size": 64, "seed": 0},
            )
            finished = wait_until(
                lambda: (j := trainer.get_job(job.job_id)).state in FINISHED and j,
                "the job to finish",
                timeout=120,
            )
        assert finished.state == pb.JOB_STATE_SUCCEEDED, finished.error
        digits = load_dataset("digits")
        with InferenceClient(infer_address) as inference:
            prediction = inference.predict("services-digits", digits.x_test[:5])
        assert prediction.version == finished.last_published_version
        assert prediction.classes.shape == (5,) and np.all(prediction.classes < 10)

        assert launcher.stop(signal.SIGINT) == 0, launcher.output()
        assert gone(children), launcher.children()
    output = launcher.output()
    assert re.search(r"^trainer \| .*event=trainer_started", output, re.MULTILINE), output
    assert re.search(r"^infer   \| .*event=infer_started", output, re.MULTILINE), output
    assert re.search(r"^trainer \| .*event=trainer_stopped", output, re.MULTILINE), output
    assert f"embedded, its data in {redis_dir}" in output
    assert f"--trainer {trainer_address}" in output and f"--server {infer_address}" in output
    assert "Traceback" not in output, output
    assert (redis_dir / "appendonly.aof").stat().st_size > 0  # kept for the next start


def test_make_services_uses_the_redis_that_redis_url_names(launcher_env, tmp_path, private_redis):
    launcher_env["REDIS_URL"] = private_redis.url
    redis_dir = tmp_path / "redis"
    with launched(launcher_env, tmp_path, "--redis-dir", str(redis_dir)) as launcher:
        launcher.wait_for_banner()
        children = launcher.children()
        assert sorted(map(program, children.values())) == ["infer_svc", "trainer_svc"], children
        with TrainerClient(launcher_env["TRAINER_LISTEN"]) as trainer:
            assert [d.name for d in trainer.list_datasets() if d.name == "digits"] == ["digits"]
        assert launcher.stop(signal.SIGTERM) == 0, launcher.output()
        assert gone(children)
    output = launcher.output()
    assert f"event=redis_connected url={private_redis.url}" in output, output
    assert "(--redis-url / REDIS_URL)" in output
    assert not redis_dir.exists()  # no embedded Redis was started


def test_a_service_that_dies_stops_the_rest_and_the_launcher_says_which(launcher_env, tmp_path):
    with launched(launcher_env, tmp_path, "--redis-dir", str(tmp_path / "redis")) as launcher:
        launcher.wait_for_banner()
        children = launcher.children()
        trainer = next(pid for pid, command in children.items() if program(command) == "trainer_svc")
        os.kill(trainer, signal.SIGKILL)
        assert launcher.process.wait(timeout=STOP_TIMEOUT) == 1
        assert gone(children)
    assert "trainer exited with code -9; stopping the rest" in launcher.output()


def test_the_services_do_not_outlive_a_killed_launcher(launcher_env, tmp_path):
    with launched(launcher_env, tmp_path, "--redis-dir", str(tmp_path / "redis")) as launcher:
        launcher.wait_for_banner()
        children = launcher.children()
        assert sorted(map(program, children.values())) == ["infer_svc", "redis-server", "trainer_svc"]
        launcher.process.kill()
        launcher.process.wait()
        wait_until(lambda: gone(children), "the launcher's children to stop", timeout=STOP_TIMEOUT)


@pytest.mark.parametrize("variable", ["TRAINER_LISTEN", "INFER_METRICS_PORT"])
def test_a_port_taken_fails_at_once_naming_its_variable(variable, launcher_env, tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        launcher_env[variable] = f"127.0.0.1:{port}" if variable.endswith("_LISTEN") else str(port)
        done = subprocess.run(
            [sys.executable, str(LAUNCHER), "--redis-dir", str(tmp_path / "redis")],
            cwd=REPO,
            env=launcher_env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1, done
    assert f"port {port} on 127.0.0.1 is taken" in done.stderr, done.stderr
    assert f"set {variable} to another" in done.stderr
    assert done.stdout == ""  # nothing was started: no service said anything
    assert not (tmp_path / "redis").exists()
