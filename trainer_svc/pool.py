"""The trainer pool's side of Redis: the shared queue, leases with fencing tokens, cancel requests.

Any number of trainers on one Redis share the work (docs/trainer-pool.md):
`take` pops the oldest queued job and leases it to this trainer with a new
fencing token, in one script; the owner `renew`s its leases well before they
expire and makes every write for the job under its token (job_repository.py,
shared.checkpoints.store: Fence), so an owner that lost its lease cannot
write over the next one (`LeaseLost`). `orphans` re-queues the unfinished
jobs that nobody holds, so a dead trainer's jobs are taken over once their
leases expire.

Keys, for prefix "tandem": `tandem:queue` (sorted set of job ids by creation
time), `tandem:job:ID:lease` (the owner's id, expiring), `tandem:job:ID:fence`
(the token), `tandem:job:ID:cancel` (a cancel asked on any trainer).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import cast

import redis

from shared.checkpoints.redis_client import DEFAULT_TIMEOUT, connect, unavailable_on_error
from shared.checkpoints.store import Fence, FenceRejected
from trainer_svc.jobs import JobRecord

log = logging.getLogger("tandem.trainer.pool")
CANCEL_SECONDS = 24 * 3600  # how long a cancel request waits for the job's owner

# KEYS: queue; ARGV: prefix, owner, lease ms, a job id ("" = the oldest queued).
# Returns {job id, token, whether the job was held before} or nil when there is nothing to take.
TAKE = """
local id = ARGV[4]
if id == '' then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0)
  if #oldest == 0 then return false end
  id = oldest[1]
end
if redis.call('ZREM', KEYS[1], id) == 0 then return false end
local job = ARGV[1] .. ':job:' .. id
-- Queued by a scan while its owner's lease had lapsed, and renewed since: it stays the owner's.
if redis.call('EXISTS', job .. ':lease') == 1 then return false end
redis.call('SET', job .. ':lease', ARGV[2], 'PX', ARGV[3])
local before = redis.call('GET', job .. ':fence')
local token = redis.call('INCR', job .. ':fence')
return {id, token, before and 1 or 0}
"""

# KEYS: lease, fence; ARGV: owner, lease ms, token. 1 if the job is still the owner's (renewed).
# The token decides: a lease that lapsed while nobody took the job over (the owner stalled, or
# Redis lost its data with the fence key too) is the owner's again; 0 once another took it.
RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return 0 end
local fence = redis.call('GET', KEYS[2])
if fence and fence ~= ARGV[3] then return 0 end
if not fence then redis.call('SET', KEYS[2], ARGV[3]) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: lease, fence, queue; ARGV: owner, token, created_at ("" = not queued again), job id.
# Gives a job up: queued again for any trainer (a shutdown) or not (it finished), lease released.
RELEASE = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: queue, lease; ARGV: created_at, job id. Queues a job nobody holds (1), else nothing (0).
REQUEUE_ORPHAN = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
return redis.call('ZADD', KEYS[1], 'NX', ARGV[1], ARGV[2])
"""


class LeaseLost(FenceRejected):
    """This trainer no longer owns the job: its lease expired and another trainer took it over."""


@dataclass(frozen=True)
class Taken:
    job_id: str
    fence: Fence
    taken_over: bool  # the job was held by a trainer before (a take-over or a resumption)


def connect_pool(url: str | None, renew_seconds: float) -> redis.Redis:
    """The pool's own Redis client, which gives up on a silent server within half a renewal.

    A primary that dies without resetting its connections (a container that is gone, a host
    that lost its network) leaves a renewal waiting for its reply. With the store's timeout
    (10 s, a whole default lease) the lease would run out before the client even tried the
    promoted replica; with half a renewal interval, the retry (which asks the Sentinels
    again) renews on the new primary while the lease still holds (lease >= 2 renewals).
    """
    return connect(url, timeout=min(DEFAULT_TIMEOUT, renew_seconds / 2))


def replica_id() -> str:
    """This trainer's name in leases: host, pid and a random part (pids repeat across restarts)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class JobPool:
    """The shared queue and this trainer's leases, in one Redis under `prefix`."""

    def __init__(self, client: redis.Redis, *, lease_ms: int, prefix: str = "tandem", owner: str = ""):
        self._redis, self._prefix = client, prefix
        self.lease_ms = lease_ms
        self.owner = owner or replica_id()
        self.queue_key = f"{prefix}:queue"
        self._take = client.register_script(TAKE)
        self._renew = client.register_script(RENEW)
        self._release = client.register_script(RELEASE)
        self._requeue_orphan = client.register_script(REQUEUE_ORPHAN)

    def _job(self, job_id: str) -> str:
        return f"{self._prefix}:job:{job_id}"

    def lease_key(self, job_id: str) -> str:
        return f"{self._job(job_id)}:lease"

    def fence_key(self, job_id: str) -> str:
        return f"{self._job(job_id)}:fence"

    def _cancel_key(self, job_id: str) -> str:
        return f"{self._job(job_id)}:cancel"

    # ------------------------------------------------------------ the queue

    def enqueue(self, record: JobRecord) -> None:
        with unavailable_on_error(self._redis):
            self._redis.zadd(self.queue_key, {record.job_id: record.created_at})

    def take(self, job_id: str = "") -> Taken | None:
        """Lease the oldest queued job (or `job_id`, if it is queued) to this trainer; None: none."""
        with unavailable_on_error(self._redis):
            reply = self._take(keys=[self.queue_key], args=[self._prefix, self.owner, self.lease_ms, job_id])
        if not reply:
            return None
        raw_id, token, before = cast(list, reply)
        taken_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        return Taken(taken_id, Fence(self.fence_key(taken_id), int(token)), bool(before))

    def queued(self) -> list[str]:
        with unavailable_on_error(self._redis):
            members = cast(list[bytes], self._redis.zrange(self.queue_key, 0, -1))
        return [m.decode() for m in members]

    # ------------------------------------------------------------ leases

    def renew(self, job_id: str, fence: Fence) -> bool:
        """Extend this trainer's lease of the job; False if another trainer has taken it over."""
        with unavailable_on_error(self._redis):
            return bool(
                self._renew(
                    keys=[self.lease_key(job_id), fence.key], args=[self.owner, self.lease_ms, fence.token]
                )
            )

    def release(self, record: JobRecord, fence: Fence, *, requeue: bool) -> bool:
        """Give the job up (queued again for any trainer if `requeue`); False if the token is stale."""
        with unavailable_on_error(self._redis):
            return bool(
                self._release(
                    keys=[self.lease_key(record.job_id), fence.key, self.queue_key],
                    args=[self.owner, fence.token, record.created_at if requeue else "", record.job_id],
                )
            )

    def requeue_orphan(self, record: JobRecord) -> bool:
        """Queue an unfinished job that no trainer holds (its owner died); True if it was queued."""
        with unavailable_on_error(self._redis):
            return bool(
                self._requeue_orphan(
                    keys=[self.queue_key, self.lease_key(record.job_id)],
                    args=[record.created_at, record.job_id],
                )
            )

    # ------------------------------------------------------------ cancel requests

    def request_cancel(self, job_id: str) -> None:
        with unavailable_on_error(self._redis):
            self._redis.set(self._cancel_key(job_id), 1, ex=CANCEL_SECONDS)

    def cancel_requested(self, job_id: str) -> bool:
        with unavailable_on_error(self._redis):
            return bool(self._redis.exists(self._cancel_key(job_id)))

    def cancels_requested(self, job_ids: list[str]) -> set[str]:
        """Which of these jobs a cancel was asked for (on any trainer)."""
        if not job_ids:
            return set()
        with unavailable_on_error(self._redis):
            flags = cast(list[bytes | None], self._redis.mget([self._cancel_key(i) for i in job_ids]))
        return {job_id for job_id, flag in zip(job_ids, flags, strict=True) if flag is not None}
