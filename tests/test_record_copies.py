"""Unit tests for the numbered record copies of trainer_svc.manager: a copy older than the saved one never lands over it.

What is tested: `_ActiveJob.copy_for_saving()` numbers copies 1, 2, 3, ...
and each is a snapshot of the record; `JobManager._write_copy` writes a
copy only if its number is above the job's `saved_copy` (so writes in any
order, from one thread or from racing threads, leave the highest-numbered
copy in Redis); `_save_copy` reports a write that Redis refused
(StoreUnavailable) as False and leaves `saved_copy` where it was, so that a
later copy, even a lower-numbered one than the one that failed, is still
written; `_RecordSaver` goes through the same check.

How: a real Redis (the `redis_client` fixture, or `private_redis` for the
test that stops it), a real JobRepository, and a JobManager built like
trainer_svc/server.py builds one, with its workers never started. Random
orders come from fixed seeds.
"""

from __future__ import annotations

import random
import threading

import pytest

from shared.checkpoints.redis_client import StoreUnavailable, connect
from shared.checkpoints.store import CheckpointStore
from shared.nn.run import Hyperparameters
from trainer_svc.datasets import DatasetCatalog
from trainer_svc.job_store import JobRepository
from trainer_svc.jobs import JobRecord, JobRequest
from trainer_svc.manager import JobManager, Settings, _ActiveJob, _RecordSaver


def manager_on(client, prefix: str = "tandem") -> JobManager:
    """A JobManager the way server.py makes one (keys under `prefix`); `start()` is never called."""
    return JobManager(CheckpointStore(client, prefix=prefix), JobRepository(client, prefix),
                      DatasetCatalog(client, prefix=prefix), Settings())


def new_job() -> _ActiveJob:
    request = JobRequest(model_name="copies", dataset="digits", spec={"layers": []},
                         hyperparameters=Hyperparameters())
    return _ActiveJob(JobRecord.new(request, owner="tester"))


def take_copy(job: _ActiveJob, step: int) -> tuple[int, JobRecord]:
    """Advance the live record to `step` and take a numbered copy, as the manager does (under lock)."""
    with job.lock:
        job.record.step = step
        job.record.history.append({"step": step})
        return job.copy_for_saving()


def saved_step(manager: JobManager, job: _ActiveJob) -> int:
    return manager.repository.get(job.record.job_id).step


@pytest.fixture
def manager(redis_client, key_prefix):
    return manager_on(redis_client, key_prefix)


def test_copies_are_numbered_in_order_and_are_snapshots():
    job = new_job()
    copies = [take_copy(job, step) for step in (10, 20, 30)]
    assert [number for number, _ in copies] == [1, 2, 3]
    assert [record.step for _, record in copies] == [10, 20, 30]
    assert [len(record.history) for _, record in copies] == [1, 2, 3]
    job.record.history.append({"step": 99})     # the live record moves on; the copies do not
    assert [len(record.history) for _, record in copies] == [1, 2, 3]
    assert job.saved_copy == 0                    # taking a copy is not saving it


@pytest.mark.parametrize("order", [(3, 1, 2), (2, 3, 1), (1, 3, 2), (1, 2, 3)])
def test_an_older_copy_written_later_does_not_replace_a_newer_one(manager, order):
    job = new_job()
    copies = {number: record for number, record in (take_copy(job, 100 * n) for n in (1, 2, 3))}
    for number in order:
        manager._write_copy(job, number, copies[number])
    assert saved_step(manager, job) == 300
    assert job.saved_copy == 3


def test_a_copy_is_not_written_twice(manager, redis_client, key_prefix):
    job = new_job()
    number, record = take_copy(job, 5)
    manager._write_copy(job, number, record)
    redis_client.delete(f"{key_prefix}:job:{job.record.job_id}")
    manager._write_copy(job, number, record)      # same number: already saved, nothing written
    assert manager.repository.get(job.record.job_id) is None


def test_racing_writers_leave_the_highest_numbered_copy(manager):
    rng = random.Random(12)
    for _ in range(5):
        job = new_job()
        copies = [take_copy(job, 10 * n) for n in range(1, 41)]
        rng.shuffle(copies)
        writers = 8
        start = threading.Barrier(writers)
        errors: list[BaseException] = []

        def write(share):
            try:
                start.wait(timeout=5)
                for number, record in share:
                    manager._write_copy(job, number, record)
            except BaseException as error:   # reported below, not lost in the thread
                errors.append(error)

        threads = [threading.Thread(target=write, args=(copies[i::writers],)) for i in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=5)
        assert not errors and not any(thread.is_alive() for thread in threads)
        assert saved_step(manager, job) == 400
        assert job.saved_copy == 40


def test_the_record_saver_does_not_write_over_a_newer_copy_saved_meanwhile(manager):
    job = new_job()
    older, newer = take_copy(job, 1), take_copy(job, 2)
    manager._write_copy(job, *newer)               # e.g. the publisher's copy, from its thread
    saver = _RecordSaver(manager, job)
    saver.submit(older)                            # the training loop's earlier copy
    assert saver.close(timeout=5) is True
    assert saved_step(manager, job) == 2
    assert job.saved_copy == 2


def test_a_write_refused_by_redis_does_not_count_as_saved(private_redis):
    client = connect(private_redis.url, retries=0, timeout=1.0)
    try:
        manager = manager_on(client)
        job = new_job()
        first, second, third = (take_copy(job, step) for step in (1, 2, 3))
        assert manager._save_copy(job, *first) is True
        with private_redis.down():
            with pytest.raises(StoreUnavailable):
                manager._write_copy(job, *third)
            assert manager._save_copy(job, *third) is False
            assert job.saved_copy == 1
        # Redis is back (empty). The failed copy 3 did not count: copy 2 is still written,
        # and copy 3, saved again, lands over it; copy 2 again then does not.
        assert manager._save_copy(job, *second) is True
        assert (job.saved_copy, saved_step(manager, job)) == (2, 2)
        assert manager._save_copy(job, *third) is True
        assert manager._save_copy(job, *second) is True    # True: not refused, only skipped
        assert (job.saved_copy, saved_step(manager, job)) == (3, 3)
    finally:
        client.close()
