"""Job records in Redis, so that any trainer (or a restarted one) lists and resumes them.

Keys: `{prefix}:job:{id}` holds a record as JSON; `{prefix}:jobs` is a
sorted set of job ids by creation time.
"""

from __future__ import annotations

import redis

from shared.redis_client import unavailable_on_error
from trainer_svc.jobs import JobRecord, JobState


class JobRepository:
    def __init__(self, client: redis.Redis, prefix: str = "tandem"):
        self._redis = client
        self._prefix = prefix

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}:job:{job_id}"

    @property
    def _index(self) -> str:
        return f"{self._prefix}:jobs"

    def save(self, record: JobRecord) -> None:
        with unavailable_on_error(self._redis):
            pipe = self._redis.pipeline(transaction=True)
            pipe.set(self._key(record.job_id), record.to_json())
            pipe.zadd(self._index, {record.job_id: record.created_at})
            pipe.execute()

    def claim_request_id(self, request_id: str, job_id: str) -> str | None:
        """Tie a client's idempotency key to `job_id`; return the job it already names, if any."""
        key = f"{self._prefix}:request:{request_id}"
        with unavailable_on_error(self._redis):
            if self._redis.set(key, job_id, nx=True, ex=7 * 24 * 3600):
                return None
            return self._redis.get(key).decode()

    def get(self, job_id: str) -> JobRecord | None:
        with unavailable_on_error(self._redis):
            text = self._redis.get(self._key(job_id))
        return JobRecord.from_json(text) if text else None

    def list(self) -> list[JobRecord]:
        """Every job, newest first."""
        with unavailable_on_error(self._redis):
            ids = self._redis.zrevrange(self._index, 0, -1)
            texts = self._redis.mget([self._key(i.decode()) for i in ids]) if ids else []
        return [JobRecord.from_json(text) for text in texts if text]

    def unfinished(self) -> list[JobRecord]:
        """Jobs that a trainer should take up again, oldest first."""
        resumable = (JobState.QUEUED, JobState.RUNNING, JobState.INTERRUPTED, JobState.CANCELLING)
        return [r for r in reversed(self.list()) if r.state in resumable]
