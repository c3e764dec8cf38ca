"""A Redis that fails over: sentinel addresses, publishes that replicas acknowledge (WAIT), and a
primary killed -9 in the middle of a series of publishes, against real processes
(shared.embedded.redis_ha: a primary, a replica and three sentinels on 127.0.0.1).

Run with -s to see the measured failover gap and the publish latency with and without WAIT."""

import itertools
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from urllib.parse import quote

import pytest
import redis
from redis.connection import SSLConnection
from redis.sentinel import SentinelConnectionPool, SentinelManagedConnection

from shared.checkpoints.redis_client import (
    SentinelAddress,
    StoreUnavailable,
    connect,
    describe,
    parse_sentinel_url,
    unavailable_on_error,
)
from shared.checkpoints.store import CheckpointStore, ReplicationShortfall
from shared.embedded.redis_ha import EmbeddedRedisHA
from shared.nn.run import Hyperparameters
from tests.test_store import NAME, meta, small_model
from trainer_svc.jobs import JobRecord, JobRequest
from trainer_svc.pool import JobPool, connect_pool

PASSWORD = "s3cret p@ss:/word"
FAILOVER_DEADLINE = 30.0  # seconds: the whole series of publishes around the kill must end by then


@pytest.fixture
def ha():
    with EmbeddedRedisHA() as redis_ha:
        yield redis_ha


def weights(model) -> dict[str, bytes]:
    return {name: array.tobytes() for name, array in model.state_dict().items()}


# Sentinel addresses


def test_a_sentinel_address_names_the_sentinels_the_master_and_the_database():
    assert parse_sentinel_url("redis+sentinel://10.0.0.1:26380,sentinel-b,[::1]:26381/tandem/2") == (
        SentinelAddress((("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 26381)), "tandem", 2)
    )
    url = f"rediss+sentinel://trainer:{quote(PASSWORD, safe='')}@s1:26379,s2:26379/tandem"
    address = parse_sentinel_url(url)
    assert (address.username, address.password, address.tls, address.db) == ("trainer", PASSWORD, True, 0)
    assert PASSWORD not in repr(address)

    client = connect(url)
    assert isinstance(client.connection_pool, SentinelConnectionPool)
    connection_class = client.connection_pool.connection_class
    assert issubclass(connection_class, SentinelManagedConnection) and issubclass(
        connection_class, SSLConnection
    )
    assert client.connection_pool.connection_kwargs["password"] == PASSWORD
    assert describe(client) == "rediss+sentinel://s1:26379,s2:26379/tandem/0"
    assert describe(connect(url, readonly=True)) == "rediss+sentinel://s1:26379,s2:26379/tandem/0 (replicas)"
    assert PASSWORD not in describe(client) and PASSWORD not in repr(client)


@pytest.mark.parametrize(
    "url, words",
    [
        ("redis+sentinel://s1:26379", "names the master after the hosts"),
        ("redis+sentinel://s1:26379/", "names the master after the hosts"),
        ("redis+sentinel:///tandem", "needs one host or more"),
        ("redis+sentinel://s1:26379,/tandem", "needs one host or more"),
        ("redis+sentinel://s1:port/tandem", "sentinel 's1' has port 'port', not a number"),
        ("redis+sentinel://s1:70000/tandem", "sentinel 's1' has port '70000', not a number"),
        ("redis+sentinel://s1/tandem/zero", "database after the master name must be a number"),
        ("redis+sentinel://s1/tandem?db=1", "takes no"),
    ],
    ids=[
        "no-master",
        "empty-master",
        "no-hosts",
        "empty-host",
        "bad-port",
        "port-too-big",
        "bad-db",
        "query",
    ],
)
def test_a_malformed_sentinel_address_is_refused_naming_redis_url(url, words):
    with pytest.raises(ValueError, match=f"^REDIS_URL: .*{words}"):
        connect(f"{url[: url.index('//') + 2]}user:{quote(PASSWORD, safe='')}@{url[url.index('//') + 2 :]}")


def test_sentinel_address_from_redis_url_connects_to_the_primary_and_readers_to_the_replica(ha, monkeypatch):
    monkeypatch.setenv("REDIS_URL", ha.url)
    client = connect()
    assert client.set("k", b"v")
    assert client.execute_command("WAIT", 1, 1000) == 1
    assert client.info("replication")["role"] == "master"
    assert client.info("server")["tcp_port"] == ha.primary_port()
    reader = connect(readonly=True)
    assert reader.info("replication")["role"] == "slave"
    assert reader.get("k") == b"v"


# Publishes that replicas acknowledge


def median_publish_ms(store: CheckpointStore, model, count: int = 20) -> float:
    times = []
    for step in range(count):
        started = time.perf_counter()
        store.publish(model, meta(step))
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def test_every_publish_is_acknowledged_by_the_replica(ha):
    client = connect(ha.url)
    shortfalls: list[ReplicationShortfall] = []
    store = CheckpointStore(client, min_replicas_ack=1, on_unreplicated=shortfalls.append)
    model = small_model(1)
    versions = [store.publish(model, meta(step)) for step in range(5)]
    assert versions == [1, 2, 3, 4, 5]
    assert shortfalls == []  # WAIT answered 1: the one replica has each of them
    # The replica has each of them (WAIT returned after it did: no waiting here).
    replica = redis.Redis.from_url(
        next(node for node in ha.nodes if node.port != ha.primary_port()).socket_url
    )
    for version in versions:
        assert replica.get(store.keys_for(NAME).blob(version)) == store.get_blob(NAME, version)

    size = len(store.get_blob(NAME, 1))
    waited = median_publish_ms(store, model)
    unwaited = median_publish_ms(CheckpointStore(client, min_replicas_ack=0), model)
    print(
        f"\npublish latency on the HA set, median of 20 ({size} byte checkpoint): "
        f"WAIT 1: {waited:.2f} ms, no WAIT: {unwaited:.2f} ms"
    )


def test_a_shortfall_of_replicas_is_reported_and_the_publish_still_returns_its_version(ha):
    shortfalls: list[ReplicationShortfall] = []
    store = CheckpointStore(
        connect(ha.url), min_replicas_ack=2, replica_ack_timeout_ms=100, on_unreplicated=shortfalls.append
    )
    assert store.publish(small_model(), meta()) == 1
    assert shortfalls == [ReplicationShortfall(NAME, 1, acked=1, wanted=2)]
    assert store.latest(NAME).meta.version == 1


def test_the_replica_settings_come_from_the_environment(monkeypatch, redis_client):
    monkeypatch.setenv("REDIS_MIN_REPLICAS_ACK", "1")
    monkeypatch.setenv("REDIS_REPLICA_ACK_TIMEOUT_MS", "50")
    shortfalls: list[ReplicationShortfall] = []
    store = CheckpointStore(redis_client, on_unreplicated=shortfalls.append)
    assert (store.min_replicas_ack, store.replica_ack_timeout_ms) == (1, 50)
    assert store.publish(small_model(), meta()) == 1  # a Redis without replicas: stored, reported
    assert shortfalls == [ReplicationShortfall(NAME, 1, acked=0, wanted=1)]
    monkeypatch.setenv("REDIS_MIN_REPLICAS_ACK", "-1")
    with pytest.raises(ValueError, match="REDIS_MIN_REPLICAS_ACK='-1': must be 0 or more"):
        CheckpointStore(redis_client)
    monkeypatch.setenv("REDIS_MIN_REPLICAS_ACK", "1")
    monkeypatch.setenv("REDIS_REPLICA_ACK_TIMEOUT_MS", "0")
    with pytest.raises(ValueError, match="REDIS_REPLICA_ACK_TIMEOUT_MS='0': must be 1 or more"):
        CheckpointStore(redis_client)
    with pytest.raises(ValueError, match="below the client's read timeout"):
        CheckpointStore(redis_client, replica_ack_timeout_ms=60_000)


def test_without_min_replicas_ack_a_publish_sends_no_wait(redis_client, store):
    def waits() -> int:
        return redis_client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0)

    shortfalls: list[ReplicationShortfall] = []
    store.on_unreplicated = shortfalls.append
    before = waits()
    store.publish(small_model(), meta())
    assert shortfalls == [] and waits() == before


# Failing over


@dataclass
class Attempt:
    started: float
    ended: float
    version: int | None  # None: StoreUnavailable
    error: str = ""


def test_a_killed_primary_fails_over_and_every_acknowledged_version_survives(ha):
    client = connect(ha.url)
    shortfalls: list[ReplicationShortfall] = []
    store = CheckpointStore(client, retention=1000, min_replicas_ack=1, on_unreplicated=shortfalls.append)
    old_port = ha.primary_port()
    published: dict[int, dict[str, bytes]] = {}
    attempts: list[Attempt] = []
    start_killing = threading.Event()
    killed_at: list[float] = []  # just before the kill, and once the process is gone

    def kill_while_publishing():
        if start_killing.wait(timeout=FAILOVER_DEADLINE):
            killed_at.append(time.monotonic())
            ha.kill_primary()  # returns once the process is gone
            killed_at.append(time.monotonic())

    killer = threading.Thread(target=kill_while_publishing, daemon=True)
    killer.start()
    deadline = time.monotonic() + FAILOVER_DEADLINE
    step = 0
    try:
        # Publish on: 5 before the kill, then until 5 have succeeded on the promoted replica.
        while sum(1 for a in attempts if len(killed_at) == 2 and a.started > killed_at[1] and a.version) < 5:
            assert time.monotonic() < deadline, f"no failover within {FAILOVER_DEADLINE} s: {attempts}"
            step += 1
            model = small_model(step)
            started = time.monotonic()
            try:
                version = store.publish(model, meta(step))
            except StoreUnavailable as error:
                attempts.append(Attempt(started, time.monotonic(), None, str(error)[:200]))
                continue
            attempts.append(Attempt(started, time.monotonic(), version))
            published[version] = weights(model)
            if len(attempts) == 5:
                start_killing.set()
    finally:
        start_killing.set()
        killer.join(timeout=5)
    new_primary = ha.wait_for_new_primary(old_port, timeout=10)
    assert new_primary.port != old_port and ha.primary_port() == new_primary.port

    # The client found the promoted replica by itself: failures only while failing over, then none.
    kill, killed = killed_at  # attempts that ended in between were in flight: either way
    first_after = next(a for a in attempts if a.version and a.ended > killed)
    failed = [a for a in attempts if a.version is None]
    assert all(kill < a.ended and a.started < first_after.started for a in failed), failed
    assert all(a.version for a in attempts if a.started > first_after.ended)

    # Versions only go up, never repeat; every acknowledged one is there, byte for byte.
    versions = [a.version for a in attempts if a.version]
    assert versions == sorted(set(versions))
    # Before the kill, the replica acknowledged each; after it, the promoted replica has none of its
    # own (the old primary stays dead): those are reported, with 0 of 1 replicas.
    unacknowledged = {shortfall.version for shortfall in shortfalls}
    acknowledged = [v for v in versions if v not in unacknowledged]
    assert {a.version for a in attempts if a.ended <= kill} <= set(acknowledged)
    assert all(s.acked == 0 and s.wanted == 1 for s in shortfalls)
    assert unacknowledged <= {a.version for a in attempts if a.version and a.ended > kill}
    for version in versions:  # the acknowledged ones survived the failover; the rest are on the new primary
        assert weights(store.get(NAME, version).model) == published[version], version
    assert store.latest_version(NAME) == versions[-1]

    before = max(a.ended for a in attempts if a.version and a.ended <= killed)
    print(
        f"\nfailover: primary 127.0.0.1:{old_port} killed -9, 127.0.0.1:{new_primary.port} promoted; "
        f"publishes stalled {first_after.ended - before:.2f} s (last success before the kill to the "
        f"first after it; {first_after.ended - killed:.2f} s from the kill), "
        f"{len(failed)} failed with StoreUnavailable, {len(versions)} versions published, "
        f"{len(unacknowledged)} unacknowledged (after the failover: no replica left)"
        + "".join(f"\n  failed after {a.ended - a.started:.2f} s: {a.error}" for a in failed)
    )


def test_a_promoted_replica_that_missed_a_publish_does_not_give_its_number_out_again(ha):
    shortfalls: list[ReplicationShortfall] = []
    store = CheckpointStore(
        connect(ha.url), min_replicas_ack=1, replica_ack_timeout_ms=200, on_unreplicated=shortfalls.append
    )
    assert store.publish(small_model(1), meta(1)) == 1  # acknowledged
    replica = next(node for node in ha.nodes if node.port != ha.primary_port())
    assert replica.pid is not None
    old_port = ha.primary_port()
    # Cut the replica off: stopped, so that it cannot reconnect, and its link closed by the
    # primary, so that nothing more is on its way to it (bytes in its socket would still arrive).
    os.kill(replica.pid, signal.SIGSTOP)
    try:
        primary = redis.Redis.from_url(ha.primary().socket_url)
        assert primary.client_kill_filter(_type="replica") == 1
        primary.close()
        assert store.publish(small_model(2), meta(2)) == 2
        assert shortfalls == [ReplicationShortfall(NAME, 2, acked=0, wanted=1)]  # reported: may be lost
        ha.kill_primary()
    finally:
        os.kill(replica.pid, signal.SIGCONT)
    assert ha.wait_for_new_primary(old_port, timeout=30).port == replica.port
    # Version 2 was lost with the primary (it was never acknowledged). The promoted replica's counter
    # says 1; a publisher that was given 2 says so, and gets 3: no number names two checkpoints.
    assert store.latest_version(NAME) == 1
    assert store.publish(small_model(3), meta(3), after=2) == 3
    assert [v["version"] for v in store.versions(NAME)] == [1, 3]


def test_with_every_sentinel_gone_the_client_fails_within_its_retries_naming_the_address(ha):
    client = connect(ha.url, retries=2)
    assert client.ping()
    url = ha.url
    ha.kill_primary()
    for sentinel in ha.sentinels:
        sentinel.kill()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as unavailable, unavailable_on_error(client):
        client.get("k")
    assert time.monotonic() - started < 10
    assert str(unavailable.value).startswith(f"Redis at {url}/0 unavailable after 3 attempts")


def test_a_lease_is_renewed_in_time_through_a_primary_that_stops_answering(ha):
    """The primary stopped, not killed (SIGSTOP): its connections stay open and never answer, as
    a container that is gone looks to its clients. The pool's client gives up on it within half
    a renewal interval, so renewals carry on on the promoted replica and the lease never lapses."""
    lease_ms, renew_seconds = 8_000, 1.0  # the failover (about 2.5 s) well inside the lease
    client = connect_pool(ha.url, renew_seconds)
    pool = JobPool(client, lease_ms=lease_ms, owner="keeper")
    request = JobRequest(model_name=NAME, dataset="digits", spec={}, hyperparameters=Hyperparameters())
    record = JobRecord.new(request)  # the pool reads only its id
    pool.enqueue(record)
    taken = pool.take()
    assert taken is not None and taken.job_id == record.job_id
    stopped = ha.primary()
    renewed_at = [time.monotonic()]
    os.kill(stopped.pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + FAILOVER_DEADLINE
        while time.monotonic() < deadline and len(renewed_at) < 8:  # a few renewals past the failover
            time.sleep(renew_seconds)  # the keeper's pace, not a synchronisation
            assert pool.renew(record.job_id, taken.fence), "another owner holds the lease"
            renewed_at.append(time.monotonic())
        promoted = ha.wait_for_new_primary(old_port=stopped.port)
    finally:
        os.kill(stopped.pid, signal.SIGCONT)
    gaps = [later - earlier for earlier, later in itertools.pairwise(renewed_at)]
    print(
        f"\nrenewals through a stopped primary: longest gap {max(gaps):.2f} s (lease {lease_ms / 1000:.0f} s)"
    )
    assert max(gaps) < lease_ms / 1000, gaps
    assert promoted.port != stopped.port
    owner = connect(f"redis://127.0.0.1:{promoted.port}/0").get(pool.lease_key(record.job_id))
    assert owner == b"keeper"
    client.close()
