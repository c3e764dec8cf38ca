"""Unit tests for trainer_svc.record_writer's numbered record copies: none lands over a newer one.

What is tested: `RecordWriter.copy(record)` numbers copies 1, 2, 3, ...
and each is a snapshot of the record; `RecordWriter.write` writes a
copy only if its number is above the writer's `saved_copy` (so writes in any
order, from one thread or from racing threads, leave the highest-numbered
copy in Redis); `RecordWriter.save` reports a write that Redis refused
(StoreUnavailable) as False and leaves `saved_copy` where it was, so that a
later copy, even a lower-numbered one than the one that failed, is still
written; `RecordSaver` goes through the same check.

How: a real Redis (the `redis_client` fixture, or `private_redis` for the
test that stops it), a real JobRepository, and each job an ActiveJob with a
RecordWriter, made as trainer_svc/manager.py makes them. Random
orders come from fixed seeds.
"""

from __future__ import annotations

import random
import threading

import pytest

from shared.checkpoints.redis_client import StoreUnavailable, connect
from shared.nn.run import Hyperparameters
from trainer_svc.job_repository import JobRepository
from trainer_svc.jobs import JobRecord, JobRequest
from trainer_svc.record_writer import RecordSaver, RecordWriter
from trainer_svc.training import ActiveJob


def new_job(repository: JobRepository) -> ActiveJob:
    request = JobRequest(
        model_name="copies", dataset="digits", spec={"layers": []}, hyperparameters=Hyperparameters()
    )
    record = JobRecord.new(request, owner="tester")
    return ActiveJob(record, RecordWriter(repository, record.job_id, outage_limit=60.0))


def take_copy(job: ActiveJob, step: int) -> tuple[int, JobRecord]:
    """Advance the live record to `step` and take a numbered copy, as the manager does (under lock)."""
    with job.lock:
        job.record.step = step
        job.record.history.append({"step": step})
        return job.writer.copy(job.record)


def saved_step(repository: JobRepository, job: ActiveJob) -> int:
    record = repository.get(job.record.job_id)
    assert record is not None, "no readable record saved"
    return record.step


@pytest.fixture
def repository(redis_client, key_prefix):
    return JobRepository(redis_client, key_prefix)


def test_copies_are_numbered_in_order_and_are_snapshots(repository):
    job = new_job(repository)
    copies = [take_copy(job, step) for step in (10, 20, 30)]
    assert [number for number, _ in copies] == [1, 2, 3]
    assert [record.step for _, record in copies] == [10, 20, 30]
    assert [len(record.history) for _, record in copies] == [1, 2, 3]
    job.record.history.append({"step": 99})  # the live record moves on; the copies do not
    assert [len(record.history) for _, record in copies] == [1, 2, 3]
    assert job.writer.saved_copy == 0  # taking a copy is not saving it


@pytest.mark.parametrize("order", [(3, 1, 2), (2, 3, 1), (1, 3, 2), (1, 2, 3)])
def test_an_older_copy_written_later_does_not_replace_a_newer_one(repository, order):
    job = new_job(repository)
    copies = dict(take_copy(job, 100 * n) for n in (1, 2, 3))
    for number in order:
        job.writer.write(number, copies[number])
    assert saved_step(repository, job) == 300
    assert job.writer.saved_copy == 3


def test_a_copy_is_not_written_twice(repository, redis_client, key_prefix):
    job = new_job(repository)
    number, record = take_copy(job, 5)
    job.writer.write(number, record)
    redis_client.delete(f"{key_prefix}:job:{job.record.job_id}")
    job.writer.write(number, record)  # same number: already saved, nothing written
    assert repository.get(job.record.job_id) is None


def write_copies(
    job: ActiveJob, start: threading.Barrier, errors: list[BaseException], share: list[tuple[int, JobRecord]]
) -> None:
    """One of the racing writers: wait for the others, then write `share` of the copies."""
    try:
        start.wait(timeout=5)
        for number, record in share:
            job.writer.write(number, record)
    except BaseException as error:  # noqa: BLE001 - reported by the test, not lost in the thread
        errors.append(error)


def test_racing_writers_leave_the_highest_numbered_copy(repository):
    rng = random.Random(12)
    for _ in range(5):
        job = new_job(repository)
        copies = [take_copy(job, 10 * n) for n in range(1, 41)]
        rng.shuffle(copies)
        writers = 8
        start = threading.Barrier(writers)
        errors: list[BaseException] = []
        threads = [
            threading.Thread(target=write_copies, args=(job, start, errors, copies[i::writers]))
            for i in range(writers)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=5)
        assert not errors and not any(thread.is_alive() for thread in threads)
        assert saved_step(repository, job) == 400
        assert job.writer.saved_copy == 40


def test_the_record_saver_does_not_write_over_a_newer_copy_saved_meanwhile(repository):
    job = new_job(repository)
    older, newer = take_copy(job, 1), take_copy(job, 2)
    job.writer.write(*newer)  # e.g. the publisher's copy, from its thread
    saver = RecordSaver(job.writer)
    saver.submit(older)  # the training loop's earlier copy
    assert saver.close(timeout=5) is True
    assert saved_step(repository, job) == 2
    assert job.writer.saved_copy == 2


def test_a_write_refused_by_redis_does_not_count_as_saved(private_redis):
    client = connect(private_redis.url, retries=0, timeout=1.0)
    try:
        repository = JobRepository(client)
        job = new_job(repository)
        first, second, third = (take_copy(job, step) for step in (1, 2, 3))
        assert job.writer.save(*first) is True
        with private_redis.down():
            with pytest.raises(StoreUnavailable):
                job.writer.write(*third)
            assert job.writer.save(*third) is False
            assert job.writer.saved_copy == 1
        # Redis is back (empty). The failed copy 3 did not count: copy 2 is still written,
        # and copy 3, saved again, lands over it; copy 2 again then does not.
        assert job.writer.save(*second) is True
        assert (job.writer.saved_copy, saved_step(repository, job)) == (2, 2)
        assert job.writer.save(*third) is True
        assert job.writer.save(*second) is True  # True: not refused, only skipped
        assert (job.writer.saved_copy, saved_step(repository, job)) == (3, 3)
    finally:
        client.close()
