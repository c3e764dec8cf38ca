"""Shared fixtures: a real Redis for the tests (never a mock).

Without REDIS_URL, one embedded redis-server (shared.embedded.redis_server) serves
the whole session and is flushed before each test. With REDIS_URL, the
tests use that server and never flush it: each test works under a key
prefix of its own (`key_prefix`, which the `store` fixture uses) and
deletes the keys under it afterwards, leaving everything else alone.

Tests that stop or restart Redis take `private_redis`, a server of their own.
"""

import uuid

import pytest

from shared.embedded.redis_server import EmbeddedRedis, redis_for_local_use
from shared.checkpoints.redis_client import connect, redis_url_from_env
from shared.checkpoints.store import CheckpointStore


@pytest.fixture(scope="session")
def redis_url():
    with redis_for_local_use() as url:
        yield url


@pytest.fixture
def key_prefix():
    return f"tandem-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_client(redis_url, key_prefix):
    client = connect(redis_url)
    users_server = redis_url_from_env() is not None
    if not users_server:
        client.flushall()
    yield client
    if users_server:
        leftovers = list(client.scan_iter(match=f"{key_prefix}:*"))
        if leftovers:
            client.delete(*leftovers)
    client.close()


@pytest.fixture
def store(redis_client, key_prefix):
    return CheckpointStore(redis_client, prefix=key_prefix)


@pytest.fixture
def private_redis():
    with EmbeddedRedis() as server:
        yield server
