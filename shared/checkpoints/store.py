"""The checkpoint store: versioned model weights in Redis, published atomically and announced.

Key layout, for prefix "tandem" and a model NAME (a `check_model_name` name):

    tandem:models                     set     the names of all published models
    tandem:model:NAME:counter         string  the last version handed out
    tandem:model:NAME:latest          string  the version readers get by default
    tandem:model:NAME:versions        hash    version -> metadata JSON (the checkpoint's
                                              header fields, plus size_bytes)
    tandem:model:NAME:v:VERSION:blob  string  the checkpoint (shared.checkpoints.checkpoint format)
    tandem:announcements              stream  one entry per publish, capped near
                                              ANNOUNCEMENTS_MAXLEN entries
    tandem:announcements              channel the same announcements over Pub/Sub

How a publish stays atomic and ordered: the publisher WATCHes the model's
counter, reads it (next version = counter + 1), encodes the checkpoint with
that version inside, and commits everything in one MULTI/EXEC: the counter,
the blob, its metadata, `latest`, the retention trim, the stream entry and
the Pub/Sub message. If another publisher committed in between, EXEC does
nothing and the publish starts over with the next number. So versions are
handed out in commit order, without gaps or duplicates, `latest` is always
the newest version, and a publisher that dies before EXEC leaves nothing
behind: Redis drops a transaction whose connection closes.

The blob is one SET in that transaction. Its value goes out in pieces, the
header and then each tensor straight from the model's arrays (no joined
copy: `checkpoint.encode_parts`, `redis_client.Pieces`), but on the wire
it is one value of the length the SET announces: Redis queues the command
only once all of it has arrived, so a publisher that dies while sending it
leaves nothing behind either.

How an acknowledged publish survives a failover: Redis replicates
asynchronously, so EXEC returns once the primary has the checkpoint, before
any replica does. Should the primary die then, Sentinel promotes a replica
that never got it: a version the publisher was told is stored is gone, and
the promoted replica's counter hands its number out again. With
`min_replicas_ack` (REDIS_MIN_REPLICAS_ACK) above 0, the publish sends WAIT
on the same connection right after EXEC: it returns once that many replicas
have everything written so far, or after `replica_ack_timeout_ms`. That
narrows the window (a replica that acknowledged has the checkpoint; Sentinel
promotes the most up-to-date replica) without closing it: WAIT is no
consensus, and a primary may die after acknowledging and before the others
caught up. When fewer replicas acknowledge in time, the publish still
returns its version (the checkpoint is stored, and announced) and reports a
shortfall: `on_unreplicated(ReplicationShortfall(...))`, which the trainer
turns into a metric. When the
connection drops during WAIT, the publish committed but nobody knows where
its checkpoint survives: it raises StoreUnavailable saying so.

Pub/Sub only reaches subscribers connected at that moment; the stream keeps
the announcements for one that was away (`announcements_since`). Both carry
the JSON {"model_name": ..., "version": ...}.

Every read of a checkpoint decodes and verifies it (checksum, architecture)
and checks that it is the model and version it was stored as. Nothing read
from Redis is ever unpickled.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, cast

import redis
from redis.client import Pipeline

from shared.checkpoints import checkpoint
from shared.checkpoints.checkpoint import Checkpoint, CheckpointError, CheckpointMeta, check_model_name
from shared.checkpoints.redis_client import (
    Pieces,
    StoreUnavailable,
    describe,
    min_replicas_ack_from_env,
    packs_pieces,
    read_timeout,
    replica_ack_timeout_ms_from_env,
    unavailable_on_error,
)
from shared.nn import Model

log = logging.getLogger("tandem.store")
DEFAULT_PREFIX = "tandem"
ANNOUNCEMENTS = "announcements"  # the stream's key and the channel, after the prefix
ANNOUNCEMENTS_MAXLEN = 10_000
STREAM_FIELD = b"announcement"
MAX_PUBLISH_ATTEMPTS = 100  # commits lost to other publishers before giving up
MAX_LATEST_READS = 5  # re-reads of `latest` while retention deletes under us
SUBSCRIBE_TIMEOUT = 10.0  # seconds to wait for Redis to confirm a subscription


class CheckpointNotFound(LookupError):
    """No such model, or no such version of it, in the store."""


class FenceRejected(RuntimeError):
    """A write refused because the writer's fencing token is no longer the current one.

    Another writer took over (it incremented the fence key): nothing of the refused
    write reached Redis. The trainer pool (docs/trainer-pool.md) calls it LeaseLost.
    """


@dataclass(frozen=True)
class Fence:
    """A fencing token: a write is made only while `key` still holds `token`, in the same transaction."""

    key: str
    token: int


@dataclass(frozen=True)
class Announcement:
    stream_id: str | None  # None when it came over Pub/Sub, which has no ids
    model_name: str
    version: int


@dataclass(frozen=True)
class ReplicationShortfall:
    """A publish that fewer replicas acknowledged (WAIT) than the store wants: stored, not yet safe."""

    model_name: str
    version: int
    acked: int
    wanted: int


class _CommittedUnconfirmed(Exception):
    """The connection dropped during the WAIT after a committed EXEC (no redis error: not retried)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class _AcknowledgedPipeline(Pipeline):
    """A transaction pipeline that, when `replicas` is set, sends WAIT right after a committed EXEC.

    WAIT counts the replicas that have this connection's writes, so it must go
    on the connection that sent the EXEC, before the pipeline hands that back
    to the pool; hence this hook in redis-py's `_execute_transaction` (which
    runs inside the pipeline's retry loop). Its errors are not redis errors:
    that loop must not retry, as if the transaction had not committed.
    """

    replicas = 0
    timeout_ms = 0
    acked: int | None = None  # the last WAIT's answer; None: not asked

    def _execute_transaction(self, connection, commands, raise_on_error) -> list:
        replies = super()._execute_transaction(connection, commands, raise_on_error)
        self.acked = None
        if self.replicas:
            try:
                connection.send_command("WAIT", self.replicas, self.timeout_ms)
                self.acked = int(connection.read_response())
            except (redis.ConnectionError, redis.TimeoutError) as error:
                connection.disconnect()
                raise _CommittedUnconfirmed(error) from error
            except redis.ResponseError as error:  # not allowed to this ACL user, or not a primary
                log.warning("event=replica_wait_refused error=%r", str(error)[:200])
                self.acked = 0
        return replies


@dataclass(frozen=True)
class ModelKeys:
    counter: str
    latest: str
    versions: str
    model: str  # what the blobs' keys start with

    def blob(self, version: int) -> str:
        return f"{self.model}:v:{version}:blob"


class CheckpointStore:
    """Checkpoints of any number of models in one Redis, under `prefix`.

    `retention` is how many of each model's newest versions a publish keeps;
    it deletes older ones, never the one `latest` points to. `redis_client` is made by
    `connect`: it answers bytes (decode_responses off; redis-py types every reply
    `bytes | str`, hence the casts where replies are read), and sends a checkpoint's
    tensors from the model's arrays, uncopied (`Pieces`).

    `min_replicas_ack` and `replica_ack_timeout_ms` (default: REDIS_MIN_REPLICAS_ACK
    and REDIS_REPLICA_ACK_TIMEOUT_MS) make each publish wait for replicas, see the
    module docstring; `on_unreplicated` is called with each ReplicationShortfall
    (default: a warning in the log).
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        retention: int = 5,
        prefix: str = DEFAULT_PREFIX,
        *,
        min_replicas_ack: int | None = None,
        replica_ack_timeout_ms: int | None = None,
        on_unreplicated: Callable[[ReplicationShortfall], None] | None = None,
    ):
        if retention < 1:
            raise ValueError(f"retention must keep at least 1 version, got {retention}")
        if not packs_pieces(redis_client):
            raise ValueError(
                "the checkpoint store needs a client made by redis_client.connect (it sends Pieces)"
            )
        self.min_replicas_ack = min_replicas_ack_from_env() if min_replicas_ack is None else min_replicas_ack
        self.replica_ack_timeout_ms = (
            replica_ack_timeout_ms_from_env() if replica_ack_timeout_ms is None else replica_ack_timeout_ms
        )
        if self.min_replicas_ack < 0:
            raise ValueError(f"min_replicas_ack must be 0 or more, got {self.min_replicas_ack}")
        timeout = read_timeout(redis_client)
        if self.min_replicas_ack and not 0 < self.replica_ack_timeout_ms < (timeout or float("inf")) * 1000:
            raise ValueError(
                f"replica_ack_timeout_ms must be above 0 and below the client's read timeout "
                f"({timeout} s), got {self.replica_ack_timeout_ms}"
            )
        self.on_unreplicated = on_unreplicated or log_shortfall
        self.redis = redis_client
        self.retention = retention
        self.prefix = prefix
        self.models_key = f"{prefix}:models"
        self.announcements_key = f"{prefix}:{ANNOUNCEMENTS}"

    def keys_for(self, name: str) -> ModelKeys:
        model = f"{self.prefix}:model:{check_model_name(name)}"
        return ModelKeys(
            counter=f"{model}:counter", latest=f"{model}:latest", versions=f"{model}:versions", model=model
        )

    # Publishing

    def publish(
        self, model: Model, meta: CheckpointMeta, fence: Fence | None = None, *, after: int = 0
    ) -> int:
        """Store `model` as the next version of `meta.model_name`, make it `latest`; return the version.

        The version is above `after` too: a publisher that was given version N passes
        after=N, so that a Redis that lost N does not give its number out again. It can
        lose it in a failover to a replica that had not received it (a publish short of
        replicas, below) or in a restart without persistence; a version number must only
        ever name one checkpoint, since inference replicas and clients hold on to it.

        With a `fence`, the publish commits only while the fence key holds its token (or
        holds nothing: a Redis that lost its data; the token is set again with the publish):
        the key is WATCHed with the counter and checked before MULTI, so a take-over
        in between aborts the EXEC, and the retry raises FenceRejected (nothing written).

        `meta.version` is ignored: the store assigns it, and writes it into the checkpoint.
        If the connection drops after EXEC was sent, the publish starts over; had
        that EXEC committed, the same weights end up stored twice, as two versions.
        With `min_replicas_ack`, a shortfall of replicas is reported (not raised),
        and a connection that drops during WAIT is StoreUnavailable (module docstring).
        """
        keys = self.keys_for(meta.model_name)
        pipe = _AcknowledgedPipeline(self.redis.connection_pool, self.redis.response_callbacks, True, None)
        pipe.replicas, pipe.timeout_ms = self.min_replicas_ack, self.replica_ack_timeout_ms
        with unavailable_on_error(self.redis), pipe:
            for _ in range(MAX_PUBLISH_ATTEMPTS):
                try:
                    version = self._publish_once(pipe, keys, model, meta, fence, after)
                except redis.WatchError:
                    continue  # another publisher committed first, or the connection dropped
                except _CommittedUnconfirmed as lost:
                    raise StoreUnavailable(
                        f"publishing {meta.model_name!r} to Redis at {describe(self.redis)}: committed, "
                        f"then the connection dropped while waiting for {self.min_replicas_ack} "
                        f"replica(s); the checkpoint may be lost in a failover: {lost.error}"
                    ) from lost.error
                self._check_replicas(meta.model_name, version, pipe.acked)
                return version
        raise StoreUnavailable(
            f"publishing {meta.model_name!r} to Redis at {describe(self.redis)}: lost the race to "
            f"other publishers {MAX_PUBLISH_ATTEMPTS} times in a row"
        )

    def _check_replicas(self, model_name: str, version: int, acked: int | None) -> None:
        if acked is None or acked >= self.min_replicas_ack:  # None: no WAIT was asked
            return
        try:
            self.on_unreplicated(ReplicationShortfall(model_name, version, acked, self.min_replicas_ack))
        except Exception:  # the publish is stored: a failing report must not fail it (and be retried)
            log.exception("event=unreplicated_report_failed model=%s version=%d", model_name, version)

    def _publish_once(
        self, pipe, keys: ModelKeys, model: Model, meta: CheckpointMeta, fence: Fence | None, after: int
    ) -> int:
        if fence is None:
            pipe.watch(keys.counter)
        else:
            pipe.watch(keys.counter, fence.key)
            current = pipe.get(fence.key)
            # No fence key: Redis lost its data (a fence key is never deleted), and the key is
            # the writer's again, set with the publish. WATCH makes a take-over meanwhile abort it.
            if current is not None and int(current) != fence.token:
                pipe.reset()
                raise FenceRejected(
                    f"publishing {meta.model_name!r}: fencing token {fence.token} is stale "
                    f"({fence.key} holds {current!r})"
                )
        version = max(int(pipe.get(keys.counter) or 0), after) + 1
        stored = _version_numbers(pipe.hkeys(keys.versions))
        encoded = checkpoint.encode_parts(model, replace(meta, version=version))
        listing = {**checkpoint.meta_fields(encoded.meta), "size_bytes": encoded.size}
        expired = stored[: max(0, len(stored) + 1 - self.retention)]  # the new version stays
        body = json.dumps({"model_name": meta.model_name, "version": version})

        pipe.multi()
        if fence is not None:
            pipe.set(fence.key, fence.token)
        pipe.set(keys.counter, version)
        pipe.set(keys.blob(version), Pieces(encoded.parts))  # the tensors sent from the model's arrays
        pipe.hset(keys.versions, str(version), json.dumps(listing))
        pipe.set(keys.latest, version)
        pipe.sadd(self.models_key, meta.model_name)
        if expired:
            pipe.delete(*(keys.blob(v) for v in expired))
            pipe.hdel(keys.versions, *(str(v) for v in expired))
        pipe.xadd(self.announcements_key, {STREAM_FIELD: body}, maxlen=ANNOUNCEMENTS_MAXLEN, approximate=True)
        pipe.publish(self.announcements_key, body)
        pipe.execute()
        return version

    # Reading

    def models(self) -> list[str]:
        with unavailable_on_error(self.redis):
            names = cast("set[bytes]", self.redis.smembers(self.models_key))  # a bytes client
        return sorted(name.decode() for name in names)

    def latest_version(self, name: str) -> int | None:
        """The version `latest` points to; None for an unknown model, CheckpointError if it is garbage."""
        with unavailable_on_error(self.redis):
            version = self.redis.get(self.keys_for(name).latest)
        if version is None:
            return None
        if not version.isdigit():  # written by something other than a publish
            raise CheckpointError(f"model {name!r}: its latest pointer {version[:40]!r} is not a version")
        return int(version)

    def latest(self, name: str) -> Checkpoint:
        """The checkpoint `latest` points to, verified.

        Between reading `latest` and reading its blob, other publishers may
        have moved `latest` on and retention deleted that blob: then read again.
        """
        for _ in range(MAX_LATEST_READS):
            version = self.latest_version(name)
            if version is None:
                raise CheckpointNotFound(self._not_found(name))
            blob = self._blob(name, version)
            if blob is not None:
                return self._verified(name, version, blob)
        raise CheckpointNotFound(
            f"model {name!r}: latest pointed at deleted versions {MAX_LATEST_READS} times in a row"
        )

    def get(self, name: str, version: int) -> Checkpoint:
        return self._verified(name, version, self.get_blob(name, version))

    def get_blob(self, name: str, version: int) -> bytes:
        """The stored checkpoint as it is, unverified (for readers that verify it themselves)."""
        blob = self._blob(name, version)
        if blob is None:
            raise CheckpointNotFound(self._not_found(name, version))
        return blob

    def versions(self, name: str) -> list[dict]:
        """Metadata of each stored version, oldest first (empty for an unknown model).

        An entry that is not one a publish writes (a version that is no number, metadata
        that is no JSON object) is skipped and logged: one bad entry must not make the
        listing fail for every reader.
        """
        with unavailable_on_error(self.redis):
            listing = self.redis.hgetall(self.keys_for(name).versions)
        readable = {}
        for field, text in listing.items():
            try:
                meta = json.loads(text)
                if not (field.isdigit() and isinstance(meta, dict) and meta.get("version") == int(field)):
                    raise ValueError("not a version's metadata")
                readable[int(field)] = meta
            except ValueError as error:
                log.warning(
                    "event=checkpoint_listing_unreadable model=%s field=%r error=%r",
                    name,
                    field[:40],
                    str(error)[:200],
                )
        return [readable[version] for version in sorted(readable)]

    def _blob(self, name: str, version: int) -> bytes | None:
        with unavailable_on_error(self.redis):
            return cast("bytes | None", self.redis.get(self.keys_for(name).blob(version)))

    @staticmethod
    def _verified(name: str, version: int, blob: bytes) -> Checkpoint:
        """Decode (checksum and architecture), and check the blob is the one its key names.

        The checksum covers the weights only, so a blob stored under another
        model's or version's key would otherwise pass.
        """
        loaded = checkpoint.decode(blob)
        if (loaded.meta.model_name, loaded.meta.version) != (name, version):
            raise CheckpointError(
                f"stored as {name!r} version {version}, but the checkpoint is "
                f"{loaded.meta.model_name!r} version {loaded.meta.version}"
            )
        return loaded

    def _not_found(self, name: str, version: int | None = None) -> str:
        with unavailable_on_error(self.redis):
            stored = _version_numbers(self.redis.hkeys(self.keys_for(name).versions))
        if not stored:
            return f"no model {name!r} in the store (models: {self.models()})"
        wanted = "no latest version" if version is None else f"no version {version}"
        return f"model {name!r} has {wanted}; stored versions: {stored}"

    # Announcements

    def announcements_since(
        self, last_id: str = "0-0", block_ms: int | None = None, count: int = 100
    ) -> list[Announcement]:
        """Up to `count` announcements after stream id `last_id`, oldest first.

        With `block_ms`, wait up to that long for one when there are none;
        it must be shorter than the client's read timeout. Continue from the
        last returned announcement's `stream_id`.
        """
        timeout = read_timeout(self.redis)
        if block_ms is not None and not 0 < block_ms < (timeout or float("inf")) * 1000:
            raise ValueError(
                f"block_ms must be above 0 and below the client's read timeout ({timeout} s), got {block_ms}"
            )
        with unavailable_on_error(self.redis):
            # RESP2's reply: [[stream, [(id, fields), ...]]]; None when none came within block_ms
            reply = cast(
                "list[list[Any]] | None",
                self.redis.xread({self.announcements_key: last_id}, count=count, block=block_ms),
            )
        return [
            _announcement(fields.get(STREAM_FIELD), stream_id.decode())
            for _stream, entries in reply or []
            for stream_id, fields in entries
        ]

    def subscribe(self) -> redis.client.PubSub:
        """A PubSub subscribed to the announcements; read it with `get_message(timeout=…)`.

        Turn its messages into announcements with `parse_announcement`. It
        misses what is published while it is disconnected: catch up with
        `announcements_since`.
        """
        pubsub = self.redis.pubsub()
        with unavailable_on_error(self.redis):
            pubsub.subscribe(self.announcements_key)
            # Wait for Redis to confirm, so that every publish from now on reaches this PubSub.
            confirmation = pubsub.get_message(timeout=SUBSCRIBE_TIMEOUT)
        if confirmation is None or confirmation["type"] != "subscribe":
            pubsub.close()
            raise StoreUnavailable(
                f"Redis at {describe(self.redis)} did not confirm the subscription "
                f"within {SUBSCRIBE_TIMEOUT} s (got {confirmation!r:.200})"
            )
        return pubsub


def log_shortfall(shortfall: ReplicationShortfall) -> None:
    """The default report of a ReplicationShortfall: a warning in the log."""
    log.warning(
        "event=checkpoint_unreplicated model=%s version=%d acked=%d wanted=%d",
        shortfall.model_name,
        shortfall.version,
        shortfall.acked,
        shortfall.wanted,
    )


def _version_numbers(fields: Iterable[bytes | str]) -> list[int]:
    """The versions a model's listing names, in order; a field no publish wrote is no version."""
    return sorted(int(field) for field in fields if field.isdigit())


def parse_announcement(message: dict | None) -> Announcement | None:
    """The announcement in a Pub/Sub message; None for no message or another kind (a subscribe notice)."""
    if message is None or message.get("type") != "message":
        return None
    return _announcement(message["data"], stream_id=None)


def _announcement(body: bytes | None, stream_id: str | None) -> Announcement:
    """Parse a JSON body; anything else in the store's channel or stream is an error."""
    try:
        fields = json.loads(body)  # type: ignore[arg-type]  # None raises TypeError: malformed
        return Announcement(stream_id, check_model_name(fields["model_name"]), int(fields["version"]))
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"malformed announcement {body!r:.200}: {error}") from None
