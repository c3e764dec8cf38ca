"""A server under test as a process of its own: started, waited for, measured, stopped.

The serving benchmark runs each server it times (Tandem's `python -m infer_svc`,
MLServer) as a subprocess, so that the server has its own interpreter, GIL and
worker processes as deployed, and the bench's clients and in-process peer take
nothing from it but the machine's cores. Its output goes to a log file, shown when
it fails to become ready.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

STOP_SECONDS = 15.0  # after SIGTERM, before SIGKILL


def child_processes(pid: int) -> list[int]:
    """The pids of `pid`'s child processes (from /proc/<pid>/stat's parent field)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # exited meanwhile
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` and its descendants (worker processes), from VmRSS."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) * 1024
    return total + sum(rss_bytes(child) for child in child_processes(pid))


class ServiceProcess:
    """`argv` run with the environment `env` (only it), from its start to `stop` (or the end of
    its `with` block); `wait_ready` waits for it to answer, with `ready(service, seconds)`,
    which returns once the server answers or raises within `seconds`.

    Starting several before waiting for any lets their starts overlap. Stopping is
    SIGTERM (a graceful shutdown, as a deployment's), then SIGKILL if it has not exited
    after STOP_SECONDS; the process leads its own process group, so that the SIGKILL
    also reaches its worker processes.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_dir: Path,
        ready: Callable[[ServiceProcess, float], None],
        cwd: Path | None = None,
    ):
        self.name, self.ready = name, ready
        self.log = log_dir / f"{name}.log"
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started = time.monotonic()
        self.ready_seconds: float | None = None  # from the start to answering

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, seconds: float) -> ServiceProcess:
        try:
            self.ready(self, seconds)
        except Exception as error:
            raise RuntimeError(
                f"{self.name} did not become ready within {seconds:g} s (exit status "
                f"{self.process.poll()}): {error}\n--- its log ---\n{self.log_tail()}"
            ) from error
        self.ready_seconds = time.monotonic() - self.started
        return self

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_SECONDS)


def poll_until(ready: Callable[[], bool], seconds: float, what: str, interval: float = 0.05) -> None:
    """Ask `ready()` every `interval` until it answers True; TimeoutError after `seconds`."""
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {seconds:g} s")
        time.sleep(interval)
