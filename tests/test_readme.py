"""The README's runnable code blocks, run as written, so that they cannot rot.

A block is runnable when the line before its opening fence is `<!-- runnable -->`:

    <!-- runnable -->
    ```sh
    .venv/bin/tandem presets
    ```

Every runnable block runs, in the order the README gives them, while the pair of
services that `make services` starts runs at the README's own addresses
(trainer 127.0.0.1:50051, inference 127.0.0.1:50052, its HTTP port
127.0.0.1:8000) on an embedded Redis: a reader who follows the README from the
top has those running too. `sh` blocks run in bash with `set -euo pipefail`,
`python` blocks in this interpreter (as doctests when they start with `>>>`, so
that their printed answers are checked too); each in one working directory shared by
all of them (a later block may read what an earlier one wrote, as a reader's
would), where `.venv` leads to the checkout's. A block passes when it exits 0.

A block whose first word is a program that is not installed (grpcurl, which
neither Debian's nor PyPI's index has here) is skipped, saying so.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RUNNABLE = re.compile(r"^<!-- runnable -->\n```(sh|python)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# The README's addresses, which the blocks name as written.
TRAINER, INFERENCE = "127.0.0.1:50051", "127.0.0.1:50052"
SERVICE_PORTS = (50051, 50052, 8000, 9101, 9102)
BLOCK_TIMEOUT = 300.0  # seconds: the longest block trains a model for a few epochs
START_TIMEOUT = 60.0
STOP_TIMEOUT = 60.0


def runnable_blocks() -> list[tuple[str, str, int]]:
    """(language, code, line number) of each runnable block, in the README's order."""
    text = README.read_text()
    return [(match[1], match[2], text.count("\n", 0, match.start()) + 2) for match in RUNNABLE.finditer(text)]


BLOCKS = runnable_blocks()


def test_the_readme_marks_blocks_runnable():
    """The marker is spelt the way RUNNABLE finds it: a misspelt one would make its block unchecked."""
    text = README.read_text()
    assert len(BLOCKS) == text.count("<!-- runnable -->") >= 8


def serving(address: str, service: str = "") -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError:
            return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def port_taken(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def readme_session(tmp_path_factory):
    """The working directory the blocks share, while `make services`' pair runs at the README's addresses."""
    taken = [port for port in SERVICE_PORTS if port_taken(port)]
    assert not taken, f"the README's ports {taken} are taken on 127.0.0.1: stop what holds them"
    workdir = tmp_path_factory.mktemp("readme")
    (workdir / ".venv").symlink_to(REPO / ".venv")
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("REDIS_", "TRAINER_", "INFER_", "TANDEM_"))
    }
    log = (workdir / "services.log").open("w")
    services = subprocess.Popen(
        # Its Redis keeps its data in the test's directory, not the checkout's .tandem/redis/.
        [sys.executable, "scripts/services.py", "--redis-dir", str(workdir / "redis")],
        cwd=REPO,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: services.poll() is not None or (serving(TRAINER) and serving(INFERENCE, "liveness")),
            "make services' trainer and inference service to answer",
            timeout=START_TIMEOUT,
        )
        assert services.poll() is None, (workdir / "services.log").read_text()
        yield workdir, environment
    finally:
        services.send_signal(signal.SIGINT)
        try:
            status = services.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            services.kill()
            status = services.wait()
        log.close()
    assert status == 0, (workdir / "services.log").read_text()


@pytest.mark.parametrize(
    ("language", "code", "line"), BLOCKS, ids=[f"README.md:{line}" for _, _, line in BLOCKS]
)
def test_runnable_block(readme_session, language, code, line):
    workdir, environment = readme_session
    program = code.split()[0]
    if language == "sh" and not program.startswith(".") and shutil.which(program) is None:
        pytest.skip(f"README.md:{line} runs {program}, which is not installed here")
    if language == "sh":
        command = ["bash", "-euo", "pipefail", "-c", code]
    elif code.startswith(">>>"):  # a doctest: each example's output is checked too
        (workdir / f"README-{line}.txt").write_text(code)
        command = [sys.executable, "-m", "doctest", f"README-{line}.txt"]
    else:
        command = [sys.executable, "-c", code]
    done = subprocess.run(
        command,
        check=False,
        cwd=workdir,
        env=environment,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
    )
    assert done.returncode == 0, (
        f"README.md:{line} exited {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )
