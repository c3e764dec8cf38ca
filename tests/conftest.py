"""Shared fixtures: a real Redis for the tests (never a mock).

Without REDIS_URL, one embedded redis-server (shared.embedded.redis_server) serves
the whole session and is flushed before each test. With REDIS_URL, the
tests use that server and never flush it: each test works under a key
prefix of its own (`key_prefix`, which the `store` fixture uses) and
deletes the keys under it afterwards, leaving everything else alone.

Tests that stop or restart Redis take `private_redis`, a server of their own.
Inference servers in-process: `checkpoints` (the store they read),
`start_inference` and `served` (two versions, unbatched; tests/inference_harness.py has the rest); trainers:
`start_trainer`, `trainer` and the module's `idle_trainer` (tests/trainer_harness.py).

Helpers every tier uses: `wait_until` (a bounded wait, never a sleep as
synchronisation; `wait_for_job` and `wait_finished` for a trainer's job) and
`metric_value` / `scrape_metrics` (Prometheus figures, in-process or over HTTP).
"""

import uuid
from collections.abc import Iterator

import pytest

from shared.checkpoints.redis_client import connect, redis_url_from_env
from shared.checkpoints.store import CheckpointStore
from shared.embedded.redis_server import EmbeddedRedis, redis_for_local_use
from tests.inference_harness import Inference, infer_config, publish
from tests.trainer_harness import Trainer, trainer_config


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
def checkpoints(private_redis) -> Iterator[CheckpointStore]:
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


@pytest.fixture
def served(checkpoints, start_inference):
    """A server (unbatched) with versions 1 and 2 of NAME published; (the running Inference,
    {version: model})."""
    models = dict(publish(checkpoints, seed=seed) for seed in (0, 1))
    return start_inference(batching=False), models


@pytest.fixture
def start_trainer(private_redis, tmp_path):
    """Start trainers (on the test's own Redis unless told otherwise); all are stopped afterwards."""
    started = []

    def start(redis_server: EmbeddedRedis = private_redis, **settings) -> Trainer:
        trainer = Trainer(redis_server, trainer_config(redis_server.url, tmp_path / "data", **settings))
        started.append(trainer)
        return trainer

    yield start
    for trainer in reversed(started):
        trainer.close()


@pytest.fixture
def trainer(start_trainer) -> Trainer:
    return start_trainer()


@pytest.fixture(scope="module")
def idle_trainer(tmp_path_factory):
    """One trainer for the tests that create no jobs (validation, health, reflection)."""
    with EmbeddedRedis() as redis_server:
        trainer = Trainer(redis_server, trainer_config(redis_server.url, tmp_path_factory.mktemp("data")))
        yield trainer
        trainer.close()
