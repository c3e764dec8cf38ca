"""Shared fixtures: a real Redis for the tests (never a mock).

Without REDIS_URL, one embedded redis-server (shared.embedded.redis_server) serves
the whole session and is flushed before each test. With REDIS_URL, the
tests use that server and never flush it: each test works under a key
prefix of its own (`key_prefix`, which the `store` fixture uses) and
deletes the keys under it afterwards, leaving everything else alone.

Tests that stop or restart Redis take `private_redis`, a server of their own.
Inference servers in-process: `checkpoints` (the store they read) and
`start_inference` (tests/inference_harness.py has the rest).

Helpers every tier uses: `wait_until` (a bounded wait, never a sleep as
synchronisation) and `metric_value` / `scrape_metrics` (Prometheus figures,
in-process or over HTTP).
"""

import time
import urllib.request
import uuid

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from shared.embedded.redis_server import EmbeddedRedis, redis_for_local_use
from shared.checkpoints.redis_client import connect, redis_url_from_env
from shared.checkpoints.store import CheckpointStore
from tests.inference_harness import Inference, infer_config

DEADLINE = 10.0   # seconds: the default bound of a wait


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


@pytest.fixture
def checkpoints(private_redis) -> CheckpointStore:
    """The checkpoint store the servers read: in the test's own Redis, under the default prefix."""
    client = connect(private_redis.url)
    yield CheckpointStore(client)
    client.close()


@pytest.fixture
def start_inference(private_redis):
    """start_inference(**settings) -> a running Inference on the test's Redis; all stopped after."""
    started: list[Inference] = []

    def start(**settings) -> Inference:
        started.append(Inference(infer_config(private_redis.url, **settings)))
        return started[-1]

    yield start
    for inference in started:
        inference.close()


# ---------------------------------------------------------------- helpers

def wait_until(condition, what: str, timeout: float = DEADLINE):
    """Poll `condition` until it returns something true, and return that; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return result


def metric_value(name: str, **labels) -> float:
    """A sample of this process's Prometheus registry (a server running in-process); 0 if absent."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def scrape_metrics(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample a /metrics endpoint on 127.0.0.1:`port` serves, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}
