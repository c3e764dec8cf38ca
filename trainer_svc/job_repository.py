"""JobRepository: job records in Redis, so that any trainer (or a restarted one) lists and resumes them.

Keys: `{prefix}:job:{id}` holds a record as JSON; `{prefix}:jobs` is a
sorted set of job ids by creation time; `{prefix}:request:{request_id}`
names the job a client's idempotency key started.

`{prefix}:job:{id}:optimizer` is a hash of the job's optimiser state for its
own resumption, field `VERSION:STEP` (the checkpoint it goes with) -> the
arrays of `Optimizer.state_dict()` as safetensors bytes (never pickled). It
holds the states of the job's two newest checkpoints: the newest is written
before the record that names its version, so a trainer that dies in between
resumes from the one before, whose state is still there. The hash goes when
the job's record is saved in a finished state: nothing resumes the job then.
Checkpoints themselves (shared.checkpoints.store) stay weights-only, all that inference reads.
"""

from __future__ import annotations

import builtins
import logging
from typing import cast

import numpy as np
import redis
import safetensors
import safetensors.numpy

from shared.checkpoints.redis_client import unavailable_on_error
from shared.checkpoints.store import Fence, FenceRejected
from trainer_svc.jobs import JobRecord, JobState

log = logging.getLogger("tandem.trainer.jobs")
REQUEST_ID_SECONDS = 7 * 24 * 3600  # how long a request_id names its job

# KEYS: request key, job key, index; ARGV: job id, record JSON, created_at, request key TTL.
CLAIM_AND_SAVE = """
local earlier = redis.call('GET', KEYS[1])
if earlier then return earlier end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[4])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return false
"""

# The writes of a job's owner in the pool (docs/trainer-pool.md): made only while the job's
# fence key holds the owner's token, checked in the same script. A fence key that is gone
# (only a Redis that lost its data loses one: takers INCR it, nothing deletes it) is the
# writer's again, as the job's record, gone with it, is only the writer's to save again.
# KEYS: fence, job key, index, optimizer key; ARGV: token, record JSON, created_at, job id, finished.
SAVE_FENCED = """
local fence = redis.call('GET', KEYS[1])
if fence and fence ~= ARGV[1] then return 0 end
if not fence then redis.call('SET', KEYS[1], ARGV[1]) end  -- Redis lost its data: ours again
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
if ARGV[5] == '1' then redis.call('DEL', KEYS[4]) end
return 1
"""

# KEYS: fence, optimizer key; ARGV: token, field, state blob, the field to keep besides.
SAVE_OPTIMIZER_FENCED = """
local fence = redis.call('GET', KEYS[1])
if fence and fence ~= ARGV[1] then return 0 end
if not fence then redis.call('SET', KEYS[1], ARGV[1]) end  -- Redis lost its data: ours again
for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do
  if f ~= ARGV[2] and f ~= ARGV[4] then redis.call('HDEL', KEYS[2], f) end
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""


class JobRepository:
    """Job records and optimiser states in Redis.

    `client` answers bytes (decode_responses off, as `connect` makes it); redis-py
    types every reply `bytes | str`, hence the casts where replies are read.
    """

    def __init__(self, client: redis.Redis, prefix: str = "tandem"):
        self._redis = client
        self._prefix = prefix
        self._claim_and_save = client.register_script(CLAIM_AND_SAVE)
        self._save_fenced = client.register_script(SAVE_FENCED)
        self._save_optimizer_fenced = client.register_script(SAVE_OPTIMIZER_FENCED)

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}:job:{job_id}"

    def _optimizer_key(self, job_id: str) -> str:
        return f"{self._key(job_id)}:optimizer"

    @property
    def _index(self) -> str:
        return f"{self._prefix}:jobs"

    def save(self, record: JobRecord, fence: Fence | None = None) -> None:
        """Save the record; with a `fence`, only while its token is current (else FenceRejected)."""
        if fence is not None:
            with unavailable_on_error(self._redis):
                saved = self._save_fenced(
                    keys=[
                        fence.key,
                        self._key(record.job_id),
                        self._index,
                        self._optimizer_key(record.job_id),
                    ],
                    args=[
                        fence.token,
                        record.to_json(),
                        record.created_at,
                        record.job_id,
                        int(record.state.finished),
                    ],
                )
            if not saved:
                raise FenceRejected(
                    f"job {record.job_id}: record refused, fencing token {fence.token} is stale"
                )
            return
        with unavailable_on_error(self._redis):
            pipe = self._redis.pipeline(transaction=True)
            pipe.set(self._key(record.job_id), record.to_json())
            pipe.zadd(self._index, {record.job_id: record.created_at})
            if record.state.finished:
                pipe.delete(self._optimizer_key(record.job_id))
            pipe.execute()

    def save_new(self, record: JobRecord, request_id: str = "") -> str | None:
        """Save a new job; with a client's idempotency key, only if no job has it yet.

        Returns the id of the job that already has `request_id` (and saves nothing),
        else None. Claiming the key and saving the record is one step (a script), so
        a retry racing the first call finds that call's job, never a key naming none.
        """
        if not request_id:
            self.save(record)
            return None
        with unavailable_on_error(self._redis):
            earlier = self._claim_and_save(
                keys=[f"{self._prefix}:request:{request_id}", self._key(record.job_id), self._index],
                args=[record.job_id, record.to_json(), record.created_at, REQUEST_ID_SECONDS],
            )
        return earlier.decode() if earlier else None

    def save_optimizer_state(
        self,
        job_id: str,
        version: int,
        step: int,
        state: dict[str, np.ndarray],
        keep: tuple[int, int],
        fence: Fence | None = None,
    ) -> None:
        """Store the optimiser state that goes with checkpoint `version` (at `step`) of a job.

        Of the states stored before, only the one of checkpoint `keep` (version, step)
        stays: the job's record may still name it. With a `fence`, only while its token
        is current (else FenceRejected, and nothing changes).
        """
        key, field = self._optimizer_key(job_id), _field(version, step)
        blob = safetensors.numpy.save(state)
        if fence is not None:
            with unavailable_on_error(self._redis):
                saved = self._save_optimizer_fenced(
                    keys=[fence.key, key], args=[fence.token, field, blob, _field(*keep)]
                )
            if not saved:
                raise FenceRejected(
                    f"job {job_id}: optimizer state refused, fencing token {fence.token} is stale"
                )
            return
        with unavailable_on_error(self._redis):
            fields = cast(list[bytes], self._redis.hkeys(key))
            stale = [f for f in fields if f.decode() not in (field, _field(*keep))]
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(key, field, blob)
            if stale:
                pipe.hdel(key, *stale)
            pipe.execute()

    def optimizer_state(self, job_id: str, version: int, step: int) -> dict[str, np.ndarray] | None:
        """The optimiser state stored with checkpoint `version` at `step`; None if there is none.

        Bytes that are not safetensors are a ValueError.
        """
        with unavailable_on_error(self._redis):
            blob = cast(bytes | None, self._redis.hget(self._optimizer_key(job_id), _field(version, step)))
        if blob is None:
            return None
        try:
            return safetensors.numpy.load(blob)
        except (safetensors.SafetensorError, ValueError) as error:
            raise ValueError(f"unreadable optimizer state: {error}") from None

    def get(self, job_id: str) -> JobRecord | None:
        """The job's record; None if there is none, or none this build can read."""
        with unavailable_on_error(self._redis):
            text = cast(bytes | None, self._redis.get(self._key(job_id)))
        return _readable(job_id, text) if text else None

    def list(self) -> list[JobRecord]:
        """Every job with a readable record, newest first."""
        with unavailable_on_error(self._redis):
            members = cast(list[bytes], self._redis.zrevrange(self._index, 0, -1))  # no scores asked
            ids = [i.decode(errors="replace") for i in members]
            texts = cast(list[bytes | None], self._redis.mget([self._key(i) for i in ids]) if ids else [])
        records = (_readable(job_id, text) for job_id, text in zip(ids, texts, strict=True) if text)
        return [record for record in records if record is not None]

    def unfinished(self) -> builtins.list[JobRecord]:  # `list` here is the method above
        """Jobs that a trainer should take up again, oldest first."""
        resumable = (JobState.QUEUED, JobState.RUNNING, JobState.INTERRUPTED, JobState.CANCELLING)
        return [r for r in reversed(self.list()) if r.state in resumable]


def _readable(job_id: str, text: bytes) -> JobRecord | None:
    """The record in `text`, or None (logged) if it is corrupt or not one of ours.

    One bad record (a foreign key, an older format, a torn write by hand) must not
    make every listing fail for every caller: it is skipped, and left for a person.
    """
    try:
        return JobRecord.from_json(text)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        log.warning("event=job_record_unreadable job=%s error=%r", job_id, str(error)[:200])
        return None


def _field(version: int, step: int) -> str:
    return f"{version}:{step}"
