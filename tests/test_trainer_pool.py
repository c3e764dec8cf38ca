"""Trainer replicas that share the work (docs/trainer-pool.md), against a real Redis.

2. Leases and fencing: a writer whose token is stale is refused, and nothing changes in Redis.
"""

from __future__ import annotations

import numpy as np
import pytest

from shared.checkpoints import store as store_module
from shared.checkpoints.checkpoint import CheckpointMeta
from shared.checkpoints.redis_client import connect
from shared.checkpoints.store import CheckpointStore, FenceRejected
from shared.nn import build_model
from shared.nn.presets import mlp
from shared.nn.run import Hyperparameters
from trainer_svc.job_repository import JobRepository
from trainer_svc.jobs import JobRecord, JobRequest, JobState
from trainer_svc.pool import JobPool

DIGITS_TRAIN = 1618  # the built-in digits' training split
POOL = {"lease_ms": 2_000, "lease_renew_ms": 500, "takeover_scan_ms": 500}  # quick take-overs


def everything(client) -> dict[bytes, bytes | None]:
    """Every key in Redis with its serialised value: what a refused write must leave as it was."""
    return {key: client.dump(key) for key in sorted(client.keys("*"))}


# ---------------------------------------------------------------- 2. leases and fencing


@pytest.fixture
def pool_parts(private_redis):
    client = connect(private_redis.url)
    yield client, JobRepository(client), CheckpointStore(client)
    client.close()


SPEC = mlp((64,), 10, hidden=(8,))


def queued_record(repository: JobRepository, pool: JobPool) -> JobRecord:
    request = JobRequest(model_name="fenced", dataset="digits", spec=SPEC, hyperparameters=Hyperparameters())
    record = JobRecord.new(request, owner="alice")
    repository.save_new(record)
    pool.enqueue(record)
    return record


def checkpoint_meta(model) -> CheckpointMeta:
    return CheckpointMeta(model_name="fenced", spec=model.spec, dtype=model.dtype.name, step=0, epoch=0)


def test_a_writer_whose_lease_was_taken_over_is_refused_and_changes_nothing(pool_parts):
    client, repository, store = pool_parts
    old_owner = JobPool(client, lease_ms=60_000, owner="old")
    new_owner = JobPool(client, lease_ms=60_000, owner="new")
    record = queued_record(repository, old_owner)
    taken = old_owner.take()
    assert taken is not None and taken.job_id == record.job_id and taken.fence.token == 1
    assert not taken.taken_over and new_owner.take() is None  # nothing else queued
    model = build_model(SPEC).initialise(0)
    meta = checkpoint_meta(model)
    assert store.publish(model, meta, taken.fence) == 1  # the owner's token: accepted
    record.state = JobState.RUNNING
    repository.save(record, taken.fence)
    repository.save_optimizer_state(record.job_id, 1, 0, {"w": np.ones(3, np.float32)}, (0, 0), taken.fence)

    # The old owner stalls; its lease expires (here: deleted) and the scan queues the job again.
    client.delete(old_owner.lease_key(record.job_id))
    assert new_owner.requeue_orphan(record)
    again = new_owner.take()
    assert again is not None and again.fence.token == 2 and again.taken_over
    assert not old_owner.renew(record.job_id, taken.fence)  # the old owner learns it at its next renewal

    before = everything(client)
    with pytest.raises(FenceRejected):
        store.publish(model, meta, taken.fence)
    stale = record.copy()
    stale.state, stale.error = JobState.FAILED, "written by a stale owner"
    with pytest.raises(FenceRejected):
        repository.save(stale, taken.fence)  # a final record would also delete the optimiser state
    with pytest.raises(FenceRejected):
        repository.save_optimizer_state(
            record.job_id, 2, 10, {"w": np.zeros(3, np.float32)}, keep=(9, 9), fence=taken.fence
        )
    assert not old_owner.release(record, taken.fence, requeue=True)
    assert everything(client) == before  # nothing of the stale owner's reached Redis

    # The new owner's writes go through.
    assert store.publish(model, meta, again.fence) == 2
    repository.save(stale, again.fence)
    assert new_owner.release(record, again.fence, requeue=False)
    assert not client.exists(new_owner.lease_key(record.job_id))
    assert not client.exists(f"tandem:job:{record.job_id}:optimizer")  # gone with the final record


def test_a_take_over_between_the_fence_check_and_exec_aborts_the_publish(pool_parts, monkeypatch):
    client, repository, store = pool_parts
    pool = JobPool(client, lease_ms=60_000)
    queued_record(repository, pool)
    taken = pool.take()
    assert taken is not None
    model = build_model(SPEC).initialise(0)
    encode = store_module.checkpoint.encode
    takeovers: list[int] = []

    def encode_while_taken_over(*args, **kwargs):
        # The publish has checked the token; a take-over's INCR lands before its EXEC.
        if not takeovers:
            takeovers.append(client.incr(taken.fence.key))
        return encode(*args, **kwargs)

    monkeypatch.setattr(store_module.checkpoint, "encode", encode_while_taken_over)
    before = everything(client)
    with pytest.raises(FenceRejected):
        store.publish(model, checkpoint_meta(model), taken.fence)
    assert takeovers == [2]
    after = everything(client)
    assert after.pop(taken.fence.key.encode()) != before.pop(taken.fence.key.encode())
    assert after == before  # the EXEC was aborted: no version, no announcement
