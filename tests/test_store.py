"""The checkpoint store against a real Redis: round trips, verification on read, atomic and
ordered publishing under concurrency, retention, announcements, and Redis going away."""

import multiprocessing
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis

from shared.checkpoints.checkpoint import CheckpointError, CheckpointMeta, read_meta
from shared.checkpoints.redis_client import StoreUnavailable, connect
from shared.checkpoints.store import Announcement, CheckpointNotFound, CheckpointStore, parse_announcement
from shared.nn import build_model
from shared.nn.presets import get_preset
from tests.test_checkpoint_format import FORMAT_1_FIXTURE, rewrite
from tests.test_spec import SMALL_CNN

NAME = "digits-cnn"


def small_model(seed: int = 0):
    return build_model(get_preset("digits-cnn").spec((1, 8, 8), 10, hidden=(16,))).initialise(seed)


def meta(step: int = 0) -> CheckpointMeta:
    return CheckpointMeta(
        model_name=NAME,
        spec={},
        dtype="",
        step=step,
        epoch=1,
        dataset="digits",
        metrics={"test_accuracy": 0.5},
    )


def next_announcement(pubsub, timeout: float = 5.0) -> Announcement:
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        announcement = parse_announcement(pubsub.get_message(timeout=remaining))
        if announcement is not None:
            return announcement
    raise AssertionError(f"no announcement within {timeout} s")


# Round trips and reads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_layer_type_round_trips_through_the_store(store, dtype):
    model = build_model(SMALL_CNN, dtype=dtype).initialise(3)
    assert store.publish(model, meta(step=7)) == 1
    x = np.random.default_rng(0).standard_normal((3, *model.input_shape))
    for loaded in (store.latest(NAME), store.get(NAME, 1)):
        assert loaded.meta.version == 1 and loaded.meta.step == 7
        for name, weights in model.state_dict().items():
            np.testing.assert_array_equal(loaded.model.state_dict()[name], weights)
        np.testing.assert_array_equal(loaded.model.predict_proba(x), model.predict_proba(x))
    assert read_meta(store.get_blob(NAME, 1)).version == 1
    assert store.latest_version(NAME) == 1 and store.models() == [NAME]


def test_versions_lists_each_versions_metadata_oldest_first(store):
    for step in (10, 20, 30):
        store.publish(small_model(step), meta(step))
    listing = store.versions(NAME)
    assert [(v["version"], v["step"]) for v in listing] == [(1, 10), (2, 20), (3, 30)]
    blob = store.get_blob(NAME, 2)
    assert listing[1]["size_bytes"] == len(blob)
    assert listing[1]["xxh3_128"] == read_meta(blob).xxh3_128 and listing[1]["sha256"] == ""
    assert listing[1]["metrics"] == {"test_accuracy": 0.5} and listing[1]["spec"]["layers"]
    assert store.versions("never-published") == []


def test_a_listing_skips_entries_no_publish_wrote_and_a_garbage_latest_is_refused(store, redis_client):
    store.publish(small_model(), meta())
    keys = store.keys_for(NAME)
    redis_client.hset(
        keys.versions, mapping={"2": b"not json", "x": b"{}", "3": b"[]", "4": b'{"version": 5}'}
    )
    assert [m["version"] for m in store.versions(NAME)] == [1]
    redis_client.set(keys.latest, b"one")
    with pytest.raises(CheckpointError, match="latest pointer"):
        store.latest_version(NAME)


def test_a_format_1_checkpoint_stored_by_an_older_build_is_still_served(store, redis_client):
    redis_client.set(store.keys_for("format-one").blob(3), FORMAT_1_FIXTURE.read_bytes())
    loaded = store.get("format-one", 3)
    assert loaded.meta.version == 3 and len(loaded.meta.sha256) == 64


def test_the_store_needs_a_client_that_sends_pieces(redis_url):
    with pytest.raises(ValueError, match=r"client made by redis_client\.connect"):
        CheckpointStore(redis.Redis.from_url(redis_url))


def test_unknown_models_and_versions_are_not_found(store):
    assert store.latest_version(NAME) is None
    with pytest.raises(CheckpointNotFound, match=r"no model 'digits-cnn' in the store \(models: \[\]\)"):
        store.latest(NAME)
    store.publish(small_model(), meta())
    store.publish(small_model(), meta())
    for read in (store.get, store.get_blob):
        with pytest.raises(
            CheckpointNotFound, match=r"model 'digits-cnn' has no version 7; stored versions: \[1, 2\]"
        ):
            read(NAME, 7)
    with pytest.raises(ValueError, match="model_name must be"):
        store.latest("../etc")


def flip_a_weight_byte(blob, _other):
    corrupted = bytearray(blob)
    corrupted[-3] ^= 0x40
    return bytes(corrupted)


def claim_a_wrong_checksum(blob, _other):
    return rewrite(blob, meta_change=lambda fields: fields.update(xxh3_128="0" * 32))


def put_another_version_there(_blob, other):
    return other


@pytest.mark.parametrize(
    "tamper, refusal",
    [
        (flip_a_weight_byte, "checksum mismatch"),
        (claim_a_wrong_checksum, "checksum mismatch"),
        (
            put_another_version_there,
            "stored as 'digits-cnn' version 2, but the checkpoint is 'digits-cnn' version 1",
        ),
    ],
)
def test_reads_refuse_a_tampered_checkpoint(store, redis_client, tamper, refusal):
    store.publish(small_model(1), meta())
    store.publish(small_model(2), meta())
    tampered = tamper(store.get_blob(NAME, 2), store.get_blob(NAME, 1))
    redis_client.set(store.keys_for(NAME).blob(2), tampered)
    for read in (lambda: store.latest(NAME), lambda: store.get(NAME, 2)):
        with pytest.raises(CheckpointError, match=refusal):
            read()
    assert store.get_blob(NAME, 2) == tampered  # raw, for readers that verify it themselves


# Atomic and ordered publishing


class PublisherKilled(Exception):
    pass


def test_a_publisher_killed_before_exec_leaves_nothing_behind(store, redis_client, key_prefix, monkeypatch):
    store.publish(small_model(1), meta(step=1))
    pubsub = store.subscribe()

    def snapshot():
        return {key: redis_client.dump(key) for key in redis_client.scan_iter(match=f"{key_prefix}:*")}

    before = snapshot()
    queued = []

    def die_before_exec(pipeline, connection, commands, raise_on_error):
        """Send MULTI and every command, then close the connection instead of sending EXEC."""
        connection.send_command("MULTI")
        assert connection.read_response() == b"OK"
        for args, _options in commands:
            connection.send_command(*args)
            assert connection.read_response() == b"QUEUED"
            queued.append(args[0])
        connection.disconnect()
        raise PublisherKilled

    monkeypatch.setattr(redis.client.Pipeline, "_execute_transaction", die_before_exec)
    with pytest.raises(PublisherKilled):
        store.publish(small_model(2), meta(step=2))
    monkeypatch.undo()

    assert queued[:4] == ["SET", "SET", "HSET", "SET"] and "XADD" in queued and "PUBLISH" in queued
    assert snapshot() == before
    assert pubsub.get_message(timeout=0.2) is None
    assert store.latest(NAME).meta.step == 1
    assert store.publish(small_model(3), meta(step=3)) == 2
    assert next_announcement(pubsub) == Announcement(None, NAME, 2)


PUBLISHES_EACH = 4


def publish_several(store: CheckpointStore, publisher: int) -> list[int]:
    """Publish PUBLISHES_EACH versions whose step says who published which one."""
    return [
        store.publish(small_model(publisher), meta(step=publisher * 100 + i)) for i in range(PUBLISHES_EACH)
    ]


def publish_from_a_process(url, prefix, publisher, start, results):
    store = CheckpointStore(connect(url), retention=5, prefix=prefix)
    start.wait(timeout=120)
    results.put((publisher, publish_several(store, publisher)))


def publish_from_a_thread(url, prefix, publisher, start):
    store = CheckpointStore(connect(url), retention=5, prefix=prefix)
    start.wait(timeout=120)
    return publisher, publish_several(store, publisher)


def test_concurrent_publishers_get_distinct_increasing_versions(redis_url, redis_client, key_prefix):
    threads, processes = [1, 2, 3], [4, 5]
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(len(threads) + len(processes)), context.Queue()
    children = [
        context.Process(
            target=publish_from_a_process, args=(redis_url, key_prefix, publisher, start, results)
        )
        for publisher in processes
    ]
    for child in children:
        child.start()
    with ThreadPoolExecutor(len(threads)) as pool:
        futures = [
            pool.submit(publish_from_a_thread, redis_url, key_prefix, publisher, start)
            for publisher in threads
        ]
        published = dict(future.result(timeout=180) for future in futures)
    published.update(results.get(timeout=180) for _ in processes)
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0

    total = PUBLISHES_EACH * (len(threads) + len(processes))
    assert sorted(v for versions in published.values() for v in versions) == list(range(1, total + 1))
    assert all(versions == sorted(versions) for versions in published.values())
    store = CheckpointStore(redis_client, retention=5, prefix=key_prefix)
    assert store.latest_version(NAME) == total
    assert [v["version"] for v in store.versions(NAME)] == list(range(total - 4, total + 1))
    step_of = {
        v: publisher * 100 + i for publisher, versions in published.items() for i, v in enumerate(versions)
    }
    for version in range(total - 4, total + 1):
        assert store.get(NAME, version).meta.step == step_of[version]


@pytest.mark.parametrize("retention", [1, 3])
def test_retention_keeps_exactly_the_newest_n(redis_client, key_prefix, retention):
    store = CheckpointStore(redis_client, retention=retention, prefix=key_prefix)
    for step in range(6):
        store.publish(small_model(step), meta(step))
    kept = list(range(7 - retention, 7))
    assert [v["version"] for v in store.versions(NAME)] == kept
    assert [redis_client.exists(store.keys_for(NAME).blob(v)) for v in range(1, 7)] == (
        [0] * (6 - retention) + [1] * retention
    )
    assert store.latest(NAME).meta.version == 6
    with pytest.raises(ValueError, match="at least 1"):
        CheckpointStore(redis_client, retention=0)


def test_latest_reads_again_when_retention_deletes_its_version_meanwhile(
    redis_url, redis_client, key_prefix, monkeypatch
):
    writer = CheckpointStore(redis_client, retention=1, prefix=key_prefix)
    reader_client = connect(redis_url)
    reader = CheckpointStore(reader_client, prefix=key_prefix)
    writer.publish(small_model(1), meta(step=1))
    read = reader_client.get

    def publish_before_reading_version_1(key):
        if key == reader.keys_for(NAME).blob(1):
            writer.publish(small_model(2), meta(step=2))  # deletes version 1
        return read(key)

    monkeypatch.setattr(reader_client, "get", publish_before_reading_version_1)
    assert reader.latest(NAME).meta.version == 2


# Announcements


def test_each_publish_is_announced_over_pubsub(store):
    pubsub = store.subscribe()
    store.publish(small_model(), meta())
    assert next_announcement(pubsub) == Announcement(None, NAME, 1)


def test_a_subscriber_that_was_away_catches_up_from_the_stream(store):
    pubsub = store.subscribe()
    store.publish(small_model(), meta())
    assert next_announcement(pubsub).version == 1
    [seen] = store.announcements_since()
    pubsub.close()  # the subscriber goes away...
    store.publish(small_model(), meta())
    store.publish(small_model(), meta())
    pubsub = store.subscribe()  # ...and comes back
    assert pubsub.get_message(timeout=0.2) is None  # Pub/Sub kept nothing for it
    missed = store.announcements_since(seen.stream_id)
    assert [(a.model_name, a.version) for a in missed] == [(NAME, 2), (NAME, 3)]
    assert store.announcements_since(missed[-1].stream_id) == []


def test_announcements_since_can_wait_for_the_next_publish(store):
    store.publish(small_model(), meta())
    [first] = store.announcements_since()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(store.announcements_since, first.stream_id, block_ms=5000)
        store.publish(small_model(), meta())
        assert [a.version for a in waiting.result(timeout=10)] == [2]
    assert store.announcements_since("$", block_ms=50) == []
    with pytest.raises(ValueError, match="read timeout"):
        store.announcements_since(block_ms=60_000)


def test_announcements_are_json_and_anything_else_is_refused():
    message = {"type": "message", "data": b'{"model_name": "digits-cnn", "version": 4}'}
    assert parse_announcement(message) == Announcement(None, NAME, 4)
    assert parse_announcement({"type": "subscribe", "data": 1}) is None
    assert parse_announcement(None) is None
    for data in (b"\x80\x04K\x01.", b'{"model_name": "../x", "version": 1}', b'{"version": 1}'):
        with pytest.raises(ValueError, match="malformed announcement"):
            parse_announcement({"type": "message", "data": data})


# Redis going away


def test_while_redis_is_down_calls_fail_clearly_and_work_again_after(private_redis):
    client = connect(private_redis.url)
    store = CheckpointStore(client)
    assert store.publish(small_model(), meta()) == 1
    with private_redis.down():
        for call in (lambda: store.publish(small_model(), meta()), lambda: store.latest(NAME)):
            started = time.monotonic()
            with pytest.raises(
                StoreUnavailable, match=r"^Redis at unix://.*/redis\.sock unavailable after 7 attempts: "
            ):
                call()
            assert time.monotonic() - started < 15.0
    assert client.keys("*") == []  # Redis is back, empty (no persistence): nothing half-written
    assert store.publish(small_model(), meta()) == 1
    assert store.latest(NAME).meta.version == 1
