"""The helpers every test tier uses: bounded waits (never a sleep as synchronisation),
Prometheus figures, in-process or over HTTP, and files replaced as rotation tools do.
Fixtures are in conftest.py.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from shared.rpc.stubs import tandem_trainer_pb2 as pb

DEADLINE = 10.0  # seconds: the default bound of a wait
FINISHED = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)


def wait_until(condition, what: str, timeout: float = DEADLINE):
    """Poll `condition` until it returns something true, and return that; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return result


def replace_file(path: Path, content: bytes) -> None:
    """Write `content` to `path` as a rotation tool would: a new file renamed into place."""
    staged = path.with_suffix(path.suffix + ".new")
    staged.write_bytes(content)
    os.replace(staged, path)


def metric_value(name: str, **labels) -> float:
    """A sample of this process's Prometheus registry (a server running in-process); 0 if absent."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def scrape_metrics(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample a /metrics endpoint on 127.0.0.1:`port` serves, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def wait_for_job(stub, job_id: str, condition, timeout: float, what: str) -> pb.Job:
    """Poll GetJob until `condition(job)` holds, and return that job; fail after `timeout` s."""

    def check():
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id), timeout=DEADLINE)
        return job if condition(job) else None

    return wait_until(check, f"job {job_id}: {what}", timeout)


def wait_finished(stub, job_id: str, timeout: float = 60) -> pb.Job:
    return wait_for_job(stub, job_id, lambda job: job.state in FINISHED, timeout, "to finish")


def interruptible_module(module: str, *args: str) -> list[str]:
    """The argv of `python -m MODULE ARGS...` with Ctrl-C raising KeyboardInterrupt in it, as in
    a terminal. A shell that starts a command in the background (`make test &`, some CI runners)
    starts it with SIGINT ignored; its children inherit that, and Python leaves an ignored SIGINT
    ignored, so a test's SIGINT would do nothing. (Not a preexec_fn: that is unsafe in a process
    with threads, as a test process serving gRPC is.)"""
    restore = "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    run = f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    return [sys.executable, "-c", restore + run, *args]
