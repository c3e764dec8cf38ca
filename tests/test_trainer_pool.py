"""Trainer replicas that share the work (docs/trainer-pool.md), against a real Redis.

1. The queue is in Redis: trainers on one Redis share it, every job succeeds once, and a job
   is watched from any trainer.
2. Leases and fencing: a writer whose token is stale is refused, and nothing changes in Redis.
3. Take-over: a trainer process killed mid-job loses its lease; another trainer resumes the
   job from its last checkpoint and optimiser state, and ends with an unbroken run's weights.
"""

from __future__ import annotations

import re
import signal
import threading

import grpc
import numpy as np
import pytest

from shared.checkpoints import store as store_module
from shared.checkpoints.checkpoint import CheckpointMeta
from shared.checkpoints.redis_client import connect
from shared.checkpoints.store import CheckpointStore, FenceRejected
from shared.data import load_dataset
from shared.embedded.redis_server import free_loopback_port
from shared.nn import build_model
from shared.nn.presets import mlp
from shared.nn.run import Hyperparameters, train
from shared.rpc.stubs import tandem_trainer_pb2 as pb
from tests.helpers import wait_finished, wait_for_job, wait_until
from tests.trainer_harness import (
    get_job,
    kinds,
    log_tail,
    mlp_job,
    saved_record,
    slow_job,
    terminate,
    trainer_process,
    watch,
)
from trainer_svc.config import TrainerConfig
from trainer_svc.event_log import STREAM_TTL_MS, JobEventLog, StreamSubscription
from trainer_svc.events import CheckpointPublished, EpochDone, Event, JobFinished, JobSnapshot, StepProgress
from trainer_svc.job_repository import JobRepository
from trainer_svc.jobs import JobRecord, JobRequest, JobState
from trainer_svc.pool import JobPool

DIGITS_TRAIN = 1618  # the built-in digits' training split
POOL = {"lease_ms": 2_000, "lease_renew_ms": 500, "takeover_scan_ms": 500}  # quick take-overs
POOL_ENV = {f"TRAINER_{name.upper()}": str(value) for name, value in POOL.items()}  # the same, for a process


def everything(client) -> dict[bytes, bytes | None]:
    """Every key in Redis with its serialised value: what a refused write must leave as it was."""
    return {key: client.dump(key) for key in sorted(client.keys("*"))}


# ---------------------------------------------------------------- 1. the queue in Redis


def test_two_trainers_share_one_queue_and_run_every_job_exactly_once(start_trainer, private_redis):
    first, second = start_trainer(**POOL), start_trainer(**POOL)
    # One slot each: two slow jobs can run at once only if each trainer takes one.
    slow = [first.stub.StartJob(slow_job(f"slow-{i}")) for i in range(2)]
    for job in slow:
        wait_for_job(first.stub, job.job_id, lambda j: j.state == pb.JOB_STATE_RUNNING, 30, "to run")
    held = {t: set(t.manager.held.ids()) for t in (first, second)}
    assert held[first] and held[second] and not held[first] & held[second]
    # Cancel reaches the owner through Redis, whichever trainer is asked.
    for job in slow:
        second.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id))
    for job in slow:
        assert wait_finished(first.stub, job.job_id).state == pb.JOB_STATE_CANCELLED

    quick = [(first, second)[i % 2].stub.StartJob(mlp_job(f"quick-{i}", epochs=1)) for i in range(6)]
    for job in quick:
        done = wait_finished(second.stub, job.job_id)  # Get answers for every job on every trainer
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
        assert done.restarts == 0
        assert get_job(first.stub, job.job_id).state == pb.JOB_STATE_SUCCEEDED
        # Trained once: one final checkpoint, version 1, and nothing else.
        assert [v["version"] for v in first.store.versions(done.model_name)] == [1]
    assert first.client.zcard("tandem:queue") == 0
    # A lease is released just after the final record that GetJob reads is saved.
    wait_until(lambda: not first.client.keys("tandem:job:*:lease"), "every lease released", timeout=10)


def test_three_trainers_share_twelve_jobs_started_through_all_of_them(start_trainer):
    trainers = [start_trainer(**POOL) for _ in range(3)]
    jobs = [trainers[i % 3].stub.StartJob(mlp_job(f"shared-{i}", epochs=3, batch_size=8)) for i in range(12)]
    done = [wait_finished(trainers[(i + 1) % 3].stub, job.job_id, timeout=240) for i, job in enumerate(jobs)]
    for job in done:
        assert job.state == pb.JOB_STATE_SUCCEEDED and job.restarts == 0, job.error
        assert [v["version"] for v in trainers[2].store.versions(job.model_name)] == [1]  # trained once
    ran_on = {
        t.manager.pool.owner: [j.job_id for j in done if j.trainer == t.manager.pool.owner] for t in trainers
    }
    assert all(ran_on.values()), f"work not spread over all three: {ran_on}"
    assert sum(map(len, ran_on.values())) == 12


def test_a_job_is_watched_from_a_trainer_that_does_not_hold_it(start_trainer):
    owner = start_trainer(**POOL)
    job = owner.stub.StartJob(slow_job("watched", every_steps=200))
    wait_for_job(owner.stub, job.job_id, lambda j: j.state == pb.JOB_STATE_RUNNING, 30, "to run")
    other = start_trainer(**POOL)  # joins once the job is held: it holds nothing of it
    events: list[pb.JobEvent] = []
    cancelled = False
    for event in other.stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=120):
        events.append(event)
        seen = kinds(events)
        if not cancelled and seen.count("checkpoint") >= 2 and "step" in seen:  # followed: now end it
            other.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id), timeout=10)
            cancelled = True
    assert get_job(other.stub, job.job_id).trainer == owner.manager.pool.owner  # held there throughout
    assert job.job_id not in other.manager.held.ids()
    assert kinds(events)[0] == "snapshot" and events[0].snapshot.state == pb.JOB_STATE_RUNNING
    assert kinds(events)[-1] == "finished" and events[-1].finished.state == pb.JOB_STATE_CANCELLED
    steps = [e.step.step for e in events if e.WhichOneof("event") == "step"]
    assert steps and steps == sorted(steps)
    published = [e.checkpoint.version for e in events if e.WhichOneof("event") == "checkpoint"]
    assert len(published) >= 3 and published == sorted(set(published))  # two, then the final one
    assert published[-1] == events[-1].finished.last_published_version
    stored = [v["version"] for v in owner.store.versions("watched")]  # the newest, as many as retained
    assert stored == published[-len(stored) :]


def test_a_jobs_stream_gives_back_every_kind_of_event_and_skips_entries_it_cannot_read(pool_parts):
    client, repository, _ = pool_parts
    log = JobEventLog(client)
    record = queued_record(repository, JobPool(client, lease_ms=1000))
    sent: list[Event] = [
        JobSnapshot(record),
        StepProgress(1, 5, 10, 0.5, 0.75, 120.0),
        EpochDone({"epoch": 1, "test_accuracy": 0.9, "step": 10}),
        CheckpointPublished({"version": 3, "step": 10}),
        JobFinished(record),
    ]
    start = log.last_id(record.job_id)
    log.append([(record.job_id, sent[0])])
    client.xadd(log.key(record.job_id), {"kind": "pickle", "data": "cos\nsystem\n"})  # never evaluated
    client.xadd(log.key(record.job_id), {"data": "{}"})
    log.append([(record.job_id, event) for event in sent[1:]])
    seen = []
    follower = StreamSubscription(log, record.job_id, start, on_close=lambda: None)
    while (event := follower.next(timeout=0.1)) is not None:
        seen.append(event)
    assert seen == sent
    assert 0 < client.pttl(log.key(record.job_id)) <= STREAM_TTL_MS


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"TRAINER_LEASE_MS": "4000", "TRAINER_LEASE_RENEW_MS": "2001"}, "TRAINER_LEASE_RENEW_MS (2001)"),
        ({"TRAINER_LEASE_RENEW_MS": "0"}, "TRAINER_LEASE_RENEW_MS (0)"),
        ({"TRAINER_LEASE_MS": "-1"}, "TRAINER_LEASE_RENEW_MS"),
        ({"TRAINER_TAKEOVER_SCAN_MS": "0"}, "TRAINER_TAKEOVER_SCAN_MS"),
        ({"TRAINER_QUEUE_POLL_MS": "-5"}, "TRAINER_QUEUE_POLL_MS"),
        ({"TRAINER_LEASE_MS": "ten seconds"}, "TRAINER_LEASE_MS='ten seconds'"),
    ],
)
def test_pool_timing_that_cannot_work_stops_the_trainer_at_start_naming_the_setting(
    monkeypatch, settings, named
):
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=re.escape(named)):
        TrainerConfig()


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
    encode = store_module.checkpoint.encode_parts
    takeovers: list[int] = []

    def encode_while_taken_over(*args, **kwargs):
        # The publish has checked the token; a take-over's INCR lands before its EXEC.
        if not takeovers:
            takeovers.append(client.incr(taken.fence.key))
        return encode(*args, **kwargs)

    monkeypatch.setattr(store_module.checkpoint, "encode_parts", encode_while_taken_over)
    before = everything(client)
    with pytest.raises(FenceRejected):
        store.publish(model, checkpoint_meta(model), taken.fence)
    assert takeovers == [2]
    after = everything(client)
    assert after.pop(taken.fence.key.encode()) != before.pop(taken.fence.key.encode())
    assert after == before  # the EXEC was aborted: no version, no announcement


# ---------------------------------------------------------------- 3. take-over


def test_a_killed_trainers_job_is_taken_over_and_ends_with_an_unbroken_runs_weights(
    start_trainer, private_redis, tmp_path
):
    log_path, data_dir = tmp_path / "trainer.log", tmp_path / "data"
    client = connect(private_redis.url)
    store, jobs = CheckpointStore(client), JobRepository(client)
    request = mlp_job("taken-over", epochs=2, batch_size=1, every_steps=300, optimizer="adam", seed=5)

    with trainer_process(private_redis.url, free_loopback_port(), log_path, data_dir, extra_env=POOL_ENV) as (
        process,
        stub,
    ):
        job = stub.StartJob(request, timeout=10)
        wait_until(
            lambda: (saved_record(jobs, job.job_id).last_published_version or 0) >= 2,
            "a record naming a second checkpoint",
            timeout=60,
        )
        # Only now does the second trainer join: the job is the killed one's, not shared at random.
        survivor = start_trainer(**POOL)
        process.kill()  # no final checkpoint, no release: the lease must expire
        process.wait(timeout=10)
    record = saved_record(jobs, job.job_id)
    assert record.state == JobState.RUNNING, log_tail(log_path)

    done = wait_finished(survivor.stub, job.job_id, timeout=120)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.restarts == 1 and done.progress.step == 2 * DIGITS_TRAIN
    assert [m.epoch for m in done.history] == [1, 2]
    final = store.get("taken-over", done.last_published_version)
    log = log_path.read_text()
    assert "optimizer_state_missing" not in log and "optimizer_state_unusable" not in log
    assert not client.exists(f"tandem:job:{job.job_id}:optimizer")
    unbroken = train(final.model.spec, load_dataset("digits"), record.request.hyperparameters).model
    for name, weights in unbroken.state_dict().items():
        assert final.model.state_dict()[name].tobytes() == weights.tobytes(), name
    client.close()


def test_a_stalled_trainer_that_lost_its_job_writes_nothing_over_the_new_owner(
    start_trainer, private_redis, tmp_path
):
    log_path, data_dir = tmp_path / "trainer.log", tmp_path / "data"
    client = connect(private_redis.url)
    store, jobs = CheckpointStore(client), JobRepository(client)
    request = mlp_job("stalled", epochs=2, batch_size=1, every_steps=300, seed=5)

    with trainer_process(private_redis.url, free_loopback_port(), log_path, data_dir, extra_env=POOL_ENV) as (
        process,
        stub,
    ):
        job = stub.StartJob(request, timeout=10)
        wait_until(
            lambda: (saved_record(jobs, job.job_id).last_published_version or 0) >= 1,
            "a record naming a first checkpoint",
            timeout=60,
        )
        survivor = start_trainer(**POOL)
        # A watch on the owner, and one on the survivor, which follows the job through Redis.
        on_owner = stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=180)
        assert next(on_owner).WhichOneof("event") == "snapshot"
        on_survivor: list[pb.JobEvent] = []
        follower = threading.Thread(target=lambda: on_survivor.extend(watch(survivor.stub, job.job_id, 180)))
        follower.start()
        process.send_signal(signal.SIGSTOP)  # stalled mid-job, holding the job as far as it knows
        try:
            done = wait_finished(survivor.stub, job.job_id, timeout=120)
        finally:
            process.send_signal(signal.SIGCONT)
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
        assert done.restarts == 1
        follower.join(timeout=60)
        # The survivor's watch went on through the take-over to the end the new owner made.
        assert on_survivor[-1].WhichOneof("event") == "finished", kinds(on_survivor)
        assert on_survivor[-1].finished.state == pb.JOB_STATE_SUCCEEDED
        # The stale owner's watch ends once it knows it lost the job: UNAVAILABLE, watch again.
        with pytest.raises(grpc.RpcError) as moved:
            for _ in on_owner:
                pass
        assert moved.value.code() == grpc.StatusCode.UNAVAILABLE, moved.value.details()
        assert "another trainer holds the job now; watch it again" in moved.value.details()
        finished = saved_record(jobs, job.job_id)
        versions = store.versions("stalled")
        # Awake again, the stalled trainer's next renewal or write is refused: it drops the job.
        wait_until(lambda: "event=job_lost" in log_path.read_text(), "the stalled trainer to drop it", 30)
        assert saved_record(jobs, job.job_id) == finished
        assert store.versions("stalled") == versions
        terminate(process, log_path)
    client.close()


def test_a_trainer_that_stops_hands_its_job_to_another_at_once(start_trainer):
    # A lease far longer than the test: the job can only move on if it is handed back.
    leaving = start_trainer(**{**POOL, "lease_ms": 600_000})
    staying = start_trainer(**{**POOL, "lease_ms": 600_000})
    job = leaving.stub.StartJob(slow_job("handed-back", every_steps=500))
    wait_for_job(leaving.stub, job.job_id, lambda j: j.state == pb.JOB_STATE_RUNNING, 30, "to run")
    owner, other = (leaving, staying) if job.job_id in leaving.manager.held.ids() else (staying, leaving)
    owner.close()
    resumed = wait_for_job(
        other.stub, job.job_id, lambda j: j.state == pb.JOB_STATE_RUNNING and j.restarts == 1, 30, "to resume"
    )
    assert resumed.last_published_version >= 1  # from the final checkpoint the first one made
    other.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id))
    assert wait_finished(other.stub, job.job_id).state == pb.JOB_STATE_CANCELLED
