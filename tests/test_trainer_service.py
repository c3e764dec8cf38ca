"""The trainer service end to end: the real gRPC server on 127.0.0.1 against a real Redis.

No mocks: jobs train on the NumPy core, checkpoints go through the checkpoint
store, calls go through the generated stubs. Most tests run the server
in-process (`TrainerServer`); the SIGTERM test runs `python -m trainer_svc`.

Every trainer gets a Redis of its own (tests/trainer_harness.py says why).

Waits are bounded: polling in a loop with a deadline, or gRPC deadlines.
"""

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import safetensors.numpy
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import REGISTRY

from shared.checkpoints.redis_client import connect
from shared.checkpoints.store import CheckpointStore
from shared.data import load_dataset
from shared.embedded.redis_server import free_loopback_port
from shared.nn.fit import evaluate
from shared.nn.run import Hyperparameters, train
from shared.rpc.stubs import tandem_trainer_pb2 as pb
from tests.helpers import metric_value, scrape_metrics, wait_finished, wait_for_job, wait_until
from tests.trainer_harness import (
    all_jobs,
    digits_arrays,
    get_job,
    kinds,
    list_checkpoints,
    log_tail,
    mlp_job,
    rpc_error,
    saved_record,
    slow_job,
    terminate,
    trainer_process,
    upload,
    watch,
)
from trainer_svc.job_repository import JobRepository
from trainer_svc.jobs import JobRecord, JobRequest, JobState

DIGITS_TRAIN, DIGITS_TEST = 1618, 179  # the built-in digits split


# ---------------------------------------------------------------- 1. a digits CNN job


def test_a_digits_cnn_job_reaches_97_percent_and_publishes_its_checkpoints(trainer):
    digits = load_dataset("digits")
    job = trainer.stub.StartJob(
        pb.StartJobRequest(
            model_name="digits-cnn",
            preset="digits-cnn",
            dataset="digits",
            hyperparameters=pb.Hyperparameters(seed=0),
            checkpoints=pb.CheckpointSchedule(every_epoch=True),
        )
    )
    assert job.state == pb.JOB_STATE_QUEUED
    assert (job.hyperparameters.epochs, job.hyperparameters.batch_size) == (15, 32)  # the preset's

    done = wait_finished(trainer.stub, job.job_id, timeout=120)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.stop_reason == "completed" and done.restarts == 0
    assert [m.epoch for m in done.history] == list(range(1, 16))
    assert done.progress.step == done.progress.steps_total == 15 * -(-DIGITS_TRAIN // 32)
    assert done.last_metrics == done.history[-1]
    assert done.last_metrics.test_accuracy >= 0.97

    listing = list_checkpoints(trainer.stub, "digits-cnn")
    versions = [c.version for c in listing]
    newest = versions[0]
    assert versions == list(range(newest, newest - len(versions), -1))  # newest first, no gaps
    assert len(versions) == min(newest, 5)  # the retention
    assert [c.latest for c in listing] == [True] + [False] * (len(listing) - 1)
    assert newest == done.last_published_version
    final = listing[0]
    assert (final.step, final.epoch, final.dataset, final.dtype) == (
        done.progress.step,
        15,
        "digits",
        "float32",
    )
    assert final.metrics["test_accuracy"] == pytest.approx(done.last_metrics.test_accuracy)

    checkpoint = trainer.store.get("digits-cnn", done.last_published_version)
    assert checkpoint.meta.step == done.progress.step
    assert (final.xxh3_128, final.sha256) == (checkpoint.meta.xxh3_128, "")  # format 2's checksum
    assert checkpoint.model.spec == json.loads(done.spec_json)
    _, accuracy = evaluate(checkpoint.model, digits.x_test, digits.y_test)
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(done.last_metrics.test_accuracy)


# ---------------------------------------------------------------- 2. watching


def without_time(event: pb.JobEvent) -> pb.JobEvent:
    copy = pb.JobEvent()
    copy.CopyFrom(event)
    copy.ClearField("time")
    return copy


def test_warm_up_and_augmentation_reach_the_trainer_and_train_as_locally(trainer):
    request = mlp_job(
        "augmented",
        epochs=2,
        optimizer="momentum",
        learning_rate=0.05,
        lr_schedule="cosine",
        warmup_epochs=0.5,
        augment_shift=1,
        augment_flip=True,
    )
    job = trainer.stub.StartJob(request)
    hp = job.hyperparameters
    assert (hp.warmup_epochs, hp.augment_shift, hp.augment_flip) == (0.5, 1, True)
    done = wait_finished(trainer.stub, job.job_id, timeout=120)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    final = trainer.store.get("augmented", done.last_published_version)
    local = train(
        final.model.spec, load_dataset("digits"), trainer.jobs.get(job.job_id).request.hyperparameters
    )
    for name, weights in local.model.state_dict().items():
        assert final.model.state_dict()[name].tobytes() == weights.tobytes(), name


def test_two_watchers_each_get_every_event_in_order(trainer):
    # The only worker is busy, so the watched job waits QUEUED until both watchers are in.
    blocker = trainer.stub.StartJob(slow_job("blocker"))
    wait_for_job(trainer.stub, blocker.job_id, lambda j: j.state == pb.JOB_STATE_RUNNING, 30, "to run")
    job = trainer.stub.StartJob(mlp_job("watched", epochs=4, every_epoch=True))
    with ThreadPoolExecutor(2) as pool:
        watchers = [pool.submit(watch, trainer.stub, job.job_id) for _ in range(2)]
        wait_until(lambda: trainer.manager.events.watcher_count(job.job_id) == 2, "two watchers", timeout=10)
        trainer.stub.CancelJob(pb.CancelJobRequest(job_id=blocker.job_id))
        streams = [watcher.result(timeout=90) for watcher in watchers]

    events = streams[0]
    assert [without_time(e) for e in streams[1]] == [without_time(e) for e in events]
    final = events[-1].finished
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
    assert kinds(events)[-1] == "finished" and kinds(events).count("finished") == 1
    assert all(e.job_id == job.job_id for e in events)

    snapshots = [e.snapshot for e in events if e.HasField("snapshot")]
    assert events[0].HasField("snapshot")
    assert [s.state for s in snapshots] == [pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING]
    assert not snapshots[0].history

    epochs = [e.epoch for e in events if e.HasField("epoch")]
    assert [m.epoch for m in epochs] == [1, 2, 3, 4]
    assert epochs == list(final.history)  # the same metrics, step included

    steps = [e.step.step for e in events if e.HasField("step")]
    assert steps == sorted(set(steps)) and steps[-1] <= final.progress.steps_total

    published = [e.checkpoint for e in events if e.HasField("checkpoint")]
    assert published, "no checkpoint events"
    assert [c.version for c in published] == sorted({c.version for c in published})
    assert published[-1].version == final.last_published_version
    assert published[-1].step == final.progress.step == final.progress.steps_total
    stored = {c.version for c in list_checkpoints(trainer.stub, "watched")}
    assert {c.version for c in published} <= stored

    # Every epoch event comes before the job's end, each epoch's checkpoint after its epoch.
    order = kinds(events)
    assert (
        order.index("snapshot") == 0 and max(i for i, k in enumerate(order) if k == "epoch") < len(order) - 1
    )
    first_epoch_at = order.index("epoch")
    assert all(i > first_epoch_at for i, k in enumerate(order) if k == "checkpoint")
    wait_until(
        lambda: trainer.manager.events.watcher_count(job.job_id) == 0,
        "the watchers to unsubscribe",
        timeout=5,
    )


def test_a_late_watcher_of_a_finished_job_gets_its_snapshot_then_finished(trainer):
    job = trainer.stub.StartJob(mlp_job("late", epochs=1))
    done = wait_finished(trainer.stub, job.job_id)
    events = watch(trainer.stub, job.job_id, timeout=10)
    assert kinds(events) == ["snapshot", "finished"]
    assert events[0].snapshot == events[1].finished == done
    assert done.state == pb.JOB_STATE_SUCCEEDED
    wait_until(
        lambda: trainer.manager.events.watcher_count(job.job_id) == 0, "the watcher to unsubscribe", timeout=5
    )


def test_a_watcher_that_disconnects_early_costs_nothing(trainer):
    job = trainer.stub.StartJob(slow_job("watched-briefly"))
    call = trainer.stub.WatchJob(pb.WatchJobRequest(job_id=job.job_id), timeout=60)
    assert next(call).HasField("snapshot")
    assert trainer.manager.events.watcher_count(job.job_id) == 1
    call.cancel()
    wait_until(
        lambda: trainer.manager.events.watcher_count(job.job_id) == 0, "the watcher to unsubscribe", timeout=5
    )
    # The job trains on regardless.
    before = get_job(trainer.stub, job.job_id).progress.step
    wait_for_job(trainer.stub, job.job_id, lambda j: j.progress.step > before, 10, "to take more steps")
    assert get_job(trainer.stub, job.job_id).state == pb.JOB_STATE_RUNNING


def test_unknown_job_ids_are_not_found_for_every_call(idle_trainer):
    stub = idle_trainer.stub
    for call, request in [
        (stub.GetJob, pb.GetJobRequest(job_id="nope")),
        (stub.CancelJob, pb.CancelJobRequest(job_id="nope")),
        (lambda r, **kw: list(stub.WatchJob(r, **kw)), pb.WatchJobRequest(job_id="nope")),
    ]:
        error = rpc_error(call, request)
        assert error.code() == grpc.StatusCode.NOT_FOUND, error
        assert "'nope'" in error.details()
    error = rpc_error(stub.ListCheckpoints, pb.ListCheckpointsRequest(model_name="never-published"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


# ---------------------------------------------------------------- 3. cancelling


def test_cancel_stops_a_running_job_within_one_step_with_a_final_checkpoint(trainer):
    job = trainer.stub.StartJob(slow_job("cancelled", every_steps=0))
    wait_for_job(trainer.stub, job.job_id, lambda j: j.progress.step >= 200, 30, "to take 200 steps")
    cancelling = trainer.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id))
    asked_at = time.monotonic()
    assert cancelling.state == pb.JOB_STATE_CANCELLING
    seen = cancelling.progress.step

    done = wait_finished(trainer.stub, job.job_id, timeout=30)
    assert time.monotonic() - asked_at < 10
    assert done.state == pb.JOB_STATE_CANCELLED, done.error
    assert done.stop_reason == "stopped" and done.finished_at.seconds
    assert seen <= done.progress.step <= seen + 1  # the step in flight, no more
    assert done.progress.step < done.progress.steps_total

    listing = list_checkpoints(trainer.stub, "cancelled")
    assert listing[0].latest and listing[0].version == done.last_published_version
    assert listing[0].step == done.progress.step
    assert trainer.store.latest("cancelled").meta.step == done.progress.step
    # Cancelling again changes nothing.
    assert trainer.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id)) == done
    assert trainer.jobs.get(job.job_id).state == JobState.CANCELLED


def test_cancel_ends_a_queued_job_at_once_without_a_checkpoint(trainer):
    blocker = trainer.stub.StartJob(slow_job("blocker"))
    queued = trainer.stub.StartJob(mlp_job("never-ran"))
    cancelled = trainer.stub.CancelJob(pb.CancelJobRequest(job_id=queued.job_id))
    assert cancelled.state == pb.JOB_STATE_CANCELLED
    assert cancelled.progress.step == 0 and not cancelled.started_at.seconds and cancelled.finished_at.seconds
    assert get_job(trainer.stub, queued.job_id).state == pb.JOB_STATE_CANCELLED
    assert trainer.jobs.get(queued.job_id).state == JobState.CANCELLED
    error = rpc_error(trainer.stub.ListCheckpoints, pb.ListCheckpointsRequest(model_name="never-ran"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    # The worker skips it and stays on the blocker.
    assert get_job(trainer.stub, blocker.job_id).state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)


# ---------------------------------------------------------------- 4. SIGTERM and restart


@pytest.mark.parametrize("optimizer, learning_rate", [("sgd", 0.05), ("momentum", 0.01), ("adam", 1e-3)])
def test_sigterm_interrupts_a_job_at_a_checkpoint_and_a_restarted_trainer_finishes_it(
    private_redis, tmp_path, optimizer, learning_rate
):
    log_path, data_dir = tmp_path / "trainer.log", tmp_path / "data"
    client = connect(private_redis.url)
    store, jobs = CheckpointStore(client), JobRepository(client)
    # The optimiser's state (momentum, Adam's moments and step) resumes with the weights, so a
    # resumed run must end with exactly the unbroken run's weights.
    request = mlp_job(
        "resumed",
        epochs=4,
        batch_size=1,
        every_steps=500,
        optimizer=optimizer,
        learning_rate=learning_rate,
        seed=3,
    )
    total = 4 * DIGITS_TRAIN

    with trainer_process(private_redis.url, free_loopback_port(), log_path, data_dir) as (process, stub):
        job = stub.StartJob(request, timeout=10)
        wait_for_job(stub, job.job_id, lambda j: j.last_published_version >= 1, 60, "a first checkpoint")
        terminate(process, log_path)

    record = saved_record(jobs, job.job_id)
    assert record.state == JobState.INTERRUPTED, log_tail(log_path)
    assert 0 < record.step < total, "the job should have been stopped mid-run"
    assert record.last_published_version >= 1
    assert record.last_published_step == record.step  # a final checkpoint where it stopped
    interrupted_at = store.get("resumed", record.last_published_version).meta.step
    assert interrupted_at == record.step
    assert [e["epoch"] for e in record.history] == list(range(1, len(record.history) + 1))

    metrics_port = free_loopback_port()
    with trainer_process(
        private_redis.url, free_loopback_port(), log_path, data_dir, metrics_port=metrics_port
    ) as (process, stub):
        done = wait_finished(stub, job.job_id, timeout=120)
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
        assert done.restarts == 1
        assert done.progress.step == done.progress.steps_total == total
        assert [m.epoch for m in done.history] == [1, 2, 3, 4]  # none twice, none missing
        # The second trainer trained only the steps after the checkpoint.
        assert scrape_metrics(metrics_port)[("tandem_trainer_steps_total", ())] == total - interrupted_at
        terminate(process, log_path)

    final = store.get("resumed", done.last_published_version)
    assert final.meta.step == total and store.latest_version("resumed") == done.last_published_version
    assert saved_record(jobs, job.job_id).state == JobState.SUCCEEDED
    assert_resumed_like_an_unbroken_run(client, job.job_id, final, record.request, log_path)
    client.close()


def assert_resumed_like_an_unbroken_run(client, job_id: str, final, request, log_path: Path) -> None:
    """The final checkpoint holds exactly the weights of the job's run trained without a break."""
    log = log_path.read_text()
    assert "optimizer_state_missing" not in log and "optimizer_state_unusable" not in log
    assert not client.exists(f"tandem:job:{job_id}:optimizer")  # gone with the job's end
    unbroken = train(final.model.spec, load_dataset("digits"), request.hyperparameters).model
    for name, weights in unbroken.state_dict().items():
        assert np.isfinite(weights).all(), name
        assert final.model.state_dict()[name].tobytes() == weights.tobytes(), name


def test_a_trainer_killed_mid_job_resumes_it_with_adams_state_from_its_last_checkpoint(
    private_redis, tmp_path
):
    log_path, data_dir = tmp_path / "trainer.log", tmp_path / "data"
    client = connect(private_redis.url)
    store, jobs = CheckpointStore(client), JobRepository(client)
    request = mlp_job("crashed", epochs=2, batch_size=1, every_steps=300, optimizer="adam", seed=5)

    with trainer_process(private_redis.url, free_loopback_port(), log_path, data_dir) as (process, stub):
        job = stub.StartJob(request, timeout=10)
        wait_until(
            lambda: (saved_record(jobs, job.job_id).last_published_version or 0) >= 2,
            "a record naming a second checkpoint",
            timeout=60,
        )
        process.kill()  # no final checkpoint: it resumes from the last periodic one
        process.wait(timeout=10)
    record = saved_record(jobs, job.job_id)
    assert record.state == JobState.RUNNING and record.last_published_step < 2 * DIGITS_TRAIN

    with trainer_process(private_redis.url, free_loopback_port(), log_path, data_dir) as (process, stub):
        done = wait_finished(stub, job.job_id, timeout=120)
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
        assert done.restarts == 1 and done.progress.step == 2 * DIGITS_TRAIN
        terminate(process, log_path)
    final = store.get("crashed", done.last_published_version)
    assert_resumed_like_an_unbroken_run(client, job.job_id, final, record.request, log_path)
    client.close()


def test_a_job_interrupted_at_an_epochs_last_step_keeps_that_epoch_when_it_resumes(
    start_trainer, private_redis
):
    # One step per epoch (the whole training set in a batch): every step is an epoch's last.
    first = start_trainer()
    job = first.stub.StartJob(mlp_job("full-batch", epochs=60, batch_size=DIGITS_TRAIN, every_epoch=True))
    wait_for_job(first.stub, job.job_id, lambda j: j.progress.step >= 10, 30, "to take 10 steps")
    first.close()
    client = connect(private_redis.url)
    record = saved_record(JobRepository(client), job.job_id)
    client.close()
    assert record.state == JobState.INTERRUPTED and record.step < 60
    assert record.last_published_step == record.step

    second = start_trainer()
    done = wait_finished(second.stub, job.job_id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.restarts == 1 and done.progress.step == 60
    assert [m.epoch for m in done.history] == list(range(1, 61))
    assert [m.step for m in done.history] == list(range(1, 61))


def test_optimizer_states_are_kept_for_a_jobs_two_newest_checkpoints_and_go_when_it_ends(
    redis_client, key_prefix
):
    jobs = JobRepository(redis_client, prefix=key_prefix)
    record = JobRecord.new(
        JobRequest(model_name="m", dataset="digits", spec={}, hyperparameters=Hyperparameters())
    )
    jobs.save(record)
    states: dict[int, dict[str, np.ndarray]] = {
        v: {"layers.0.W.exp_avg": np.full((2, 3), v, np.float32), "step": np.array(v, np.int64)}
        for v in (1, 2, 3)
    }
    jobs.save_optimizer_state(record.job_id, 1, 100, states[1], keep=(0, 0))
    jobs.save_optimizer_state(record.job_id, 2, 200, states[2], keep=(1, 100))
    jobs.save_optimizer_state(record.job_id, 3, 300, states[3], keep=(2, 200))
    assert jobs.optimizer_state(record.job_id, 1, 100) is None  # older than the kept one
    assert jobs.optimizer_state(record.job_id, 2, 250) is None  # another step: not its state
    for version in (2, 3):
        loaded = jobs.optimizer_state(record.job_id, version, version * 100)
        assert loaded is not None
        assert {k: (v.dtype, v.shape, v.tobytes()) for k, v in loaded.items()} == {
            k: (v.dtype, v.shape, v.tobytes()) for k, v in states[version].items()
        }
    record.state = JobState.INTERRUPTED
    jobs.save(record)  # resumable: kept
    assert jobs.optimizer_state(record.job_id, 3, 300) is not None
    redis_client.hset(f"{key_prefix}:job:{record.job_id}:optimizer", "3:300", b"not safetensors")
    with pytest.raises(ValueError, match="unreadable optimizer state"):
        jobs.optimizer_state(record.job_id, 3, 300)
    record.state = JobState.SUCCEEDED
    jobs.save(record)  # nothing resumes it now
    assert not redis_client.exists(f"{key_prefix}:job:{record.job_id}:optimizer")


@pytest.mark.parametrize(
    "lose, event",
    [
        ("deleted", "optimizer_state_missing"),  # as when Redis loses it
        ("unreadable", "optimizer_state_unusable"),
        ("velocity form", "optimizer_state_unusable"),  # momentum saved by a trainer before the buffer form
    ],
)
def test_a_job_whose_optimizer_state_is_lost_resumes_with_a_fresh_one(
    start_trainer, private_redis, caplog, lose, event
):
    first = start_trainer()
    job = first.stub.StartJob(
        mlp_job(
            "lost-state", epochs=2, batch_size=1, every_steps=500, optimizer="momentum", learning_rate=0.01
        )
    )
    wait_for_job(first.stub, job.job_id, lambda j: j.last_published_version >= 1, 30, "a first checkpoint")
    first.close()
    client = connect(private_redis.url)
    record = saved_record(JobRepository(client), job.job_id)
    version, step = record.last_published_version, record.last_published_step
    assert record.state == JobState.INTERRUPTED and 0 < step < 2 * DIGITS_TRAIN
    state = JobRepository(client).optimizer_state(job.job_id, version, step)
    assert state is not None and state["momentum_form"] == 1
    key = f"tandem:job:{job.job_id}:optimizer"
    if lose == "deleted":
        client.delete(key)
    elif lose == "unreadable":
        client.hset(key, f"{version}:{step}", b"\x00" * 16)
    else:  # the same buffers without the form's tag: what an older trainer saved
        del state["momentum_form"]
        client.hset(key, f"{version}:{step}", safetensors.numpy.save(state))
    client.close()

    with caplog.at_level(logging.WARNING, logger="tandem.trainer.jobs"):
        second = start_trainer()
        done = wait_finished(second.stub, job.job_id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.restarts == 1 and done.progress.step == 2 * DIGITS_TRAIN
    assert [m.epoch for m in done.history] == [1, 2]
    logged = [r.getMessage() for r in caplog.records if "event=optimizer_state_" in r.getMessage()]
    assert len(logged) == 1, logged
    assert logged[0].startswith(f"event={event} job={job.job_id} version={version} step={step} "), logged
    if lose == "velocity form":
        assert "velocity form" in logged[0], logged


# ---------------------------------------------------------------- 5. bad requests

BAD_REQUESTS = [
    # (what, StartJobRequest fields, status, words the message must contain)
    (
        "unknown preset",
        dict(preset="no-such-preset"),
        grpc.StatusCode.NOT_FOUND,
        ["preset", "no-such-preset"],
    ),
    (
        "unknown layer type",
        dict(
            spec_json=json.dumps(
                {"input_shape": [1, 8, 8], "layers": [{"type": "flatten"}, {"type": "wormhole", "units": 3}]}
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["layer 1", "wormhole"],
    ),
    (
        "layer shapes that do not fit",
        dict(spec_json=json.dumps({"input_shape": [1, 8, 8], "layers": [{"type": "dense", "units": 10}]})),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["layer 0", "dense", "(1, 8, 8)"],
    ),
    (
        "a spec for other samples",
        dict(spec_json=json.dumps({"input_shape": [64], "layers": [{"type": "dense", "units": 10}]})),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["input_shape", "digits"],
    ),
    (
        "a spec with too few classes",
        dict(
            spec_json=json.dumps(
                {"input_shape": [1, 8, 8], "layers": [{"type": "flatten"}, {"type": "dense", "units": 5}]}
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["classes"],
    ),
    (
        "spec_json that is not JSON",
        dict(spec_json="{layers"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["spec_json"],
    ),
    (
        "hidden widths with a spec",
        dict(
            spec_json=json.dumps(
                {"input_shape": [1, 8, 8], "layers": [{"type": "flatten"}, {"type": "dense", "units": 10}]}
            ),
            hidden=[16],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["hidden"],
    ),
    ("no architecture", dict(), grpc.StatusCode.INVALID_ARGUMENT, ["preset", "spec"]),
    (
        "unknown dataset",
        dict(preset="mlp", dataset="no-such-data"),
        grpc.StatusCode.NOT_FOUND,
        ["no-such-data"],
    ),
    (
        "learning_rate 0",
        dict(preset="mlp", hyperparameters=pb.Hyperparameters(learning_rate=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["learning_rate"],
    ),
    (
        "learning_rate < 0",
        dict(preset="mlp", hyperparameters=pb.Hyperparameters(learning_rate=-0.1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["learning_rate"],
    ),
    (
        "batch_size 0",
        dict(preset="mlp", hyperparameters=pb.Hyperparameters(batch_size=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["batch_size"],
    ),
    (
        "batch_size above the dataset",
        dict(preset="mlp", hyperparameters=pb.Hyperparameters(batch_size=5000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["batch_size", "1618"],
    ),
    (
        "epochs 0",
        dict(preset="mlp", hyperparameters=pb.Hyperparameters(epochs=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["epochs"],
    ),
    (
        "epochs < 0",
        dict(preset="mlp", hyperparameters=pb.Hyperparameters(epochs=-3)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["epochs"],
    ),
    (
        "unknown optimizer",
        dict(preset="mlp", hyperparameters=pb.Hyperparameters(optimizer="rmsprop")),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["optimizer", "rmsprop"],
    ),
    (
        "negative checkpoint interval",
        dict(preset="mlp", checkpoints=pb.CheckpointSchedule(every_steps=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["every_steps"],
    ),
    (
        "resume from a version that does not exist",
        dict(preset="mlp", resume_from_version=3),
        grpc.StatusCode.NOT_FOUND,
        ["resume_from_version 3", "'refused'"],
    ),
    (
        "model_name with a space",
        dict(preset="mlp", model_name="bad name"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["model_name", "'bad name'"],
    ),
    (
        "model_name with a path",
        dict(preset="mlp", model_name="../etc/passwd"),
        grpc.StatusCode.INVALID_ARGUMENT,
        ["model_name"],
    ),
    ("empty model_name", dict(preset="mlp", model_name=""), grpc.StatusCode.INVALID_ARGUMENT, ["model_name"]),
]


@pytest.mark.parametrize(
    "fields, status, words", [case[1:] for case in BAD_REQUESTS], ids=[case[0] for case in BAD_REQUESTS]
)
def test_a_bad_request_gets_its_status_and_creates_no_job(idle_trainer, fields, status, words):
    before = [job.job_id for job in all_jobs(idle_trainer.stub)]
    request = pb.StartJobRequest(**{"model_name": "refused", "dataset": "digits", **fields})
    error = rpc_error(idle_trainer.stub.StartJob, request)
    assert error.code() == status, error.details()
    for word in words:
        assert word in error.details(), error.details()
    assert [job.job_id for job in all_jobs(idle_trainer.stub)] == before
    assert [record.job_id for record in idle_trainer.jobs.list()] == before


# ---------------------------------------------------------------- 6. Redis going away


def publish_failures() -> float:
    return REGISTRY.get_sample_value("tandem_trainer_checkpoint_publish_failures_total") or 0.0


def test_a_redis_outage_mid_job_does_not_fail_it(trainer):
    """Redis stops (longer than the client's own retries) and comes back empty; the job ends well."""
    failures = publish_failures()
    job = trainer.stub.StartJob(mlp_job("outage", epochs=1, batch_size=1, every_steps=50))
    wait_for_job(trainer.stub, job.job_id, lambda j: j.last_published_version >= 5, 30, "5 checkpoints")
    with trainer.redis.down():
        # Training goes on without Redis (GetJob answers from the trainer's memory) ...
        wait_for_job(trainer.stub, job.job_id, lambda j: j.progress.step == DIGITS_TRAIN, 30, "its last step")
        # ... and the checkpoints wait for Redis, past the client's own retries (about 5 s).
        wait_until(lambda: publish_failures() > failures, "a publish to fail", timeout=30)
        assert get_job(trainer.stub, job.job_id).state == pb.JOB_STATE_RUNNING
    done = wait_finished(trainer.stub, job.job_id, timeout=90)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error

    # Redis came back empty: the versions start again at 1, and the job's record names the new ones.
    latest = trainer.store.latest("outage")
    assert latest.meta.step == DIGITS_TRAIN
    assert done.last_published_version == latest.meta.version
    record = trainer.jobs.get(job.job_id)  # saved again once Redis was back
    assert record is not None and record.state == JobState.SUCCEEDED
    assert (record.last_published_version, record.step) == (latest.meta.version, DIGITS_TRAIN)
    assert [j.job_id for j in all_jobs(trainer.stub)] == [job.job_id]


def test_epochs_go_on_during_a_redis_outage_and_their_records_are_saved_after_it(trainer):
    """An epoch's record is saved off the training thread: during an outage, when each save
    fails only after the client's retries (about 5 s), the epochs go on at their own pace."""
    epochs = 60  # 51 steps each, a few ms
    job = trainer.stub.StartJob(mlp_job("outage-epochs", epochs=epochs))
    wait_for_job(trainer.stub, job.job_id, lambda j: len(j.history) >= 2, 30, "2 epochs")
    with trainer.redis.down():
        first = get_job(trainer.stub, job.job_id).progress.epoch
        started = time.monotonic()
        # Four epoch ends with their record saves failing: waiting for them took 20 s and more.
        seen = wait_for_job(
            trainer.stub,
            job.job_id,
            lambda j: j.progress.epoch >= first + 4,
            10,
            "4 epochs during the outage",
        )
        assert time.monotonic() - started < 10
        assert seen.state == pb.JOB_STATE_RUNNING
    done = wait_finished(trainer.stub, job.job_id, timeout=90)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert [m.epoch for m in done.history] == list(range(1, epochs + 1))
    # Redis came back empty; the final record is in it, and no older copy landed after it.
    record = wait_until(lambda: trainer.jobs.get(job.job_id), "the record to be saved again", timeout=30)
    assert record.state == JobState.SUCCEEDED and record.step == epochs * 51
    assert [e["epoch"] for e in record.history] == list(range(1, epochs + 1))
    assert record.last_published_version == trainer.store.latest_version("outage-epochs")


def test_final_states_reached_while_redis_refuses_writes_are_saved_once_it_takes_them(trainer):
    blocker = trainer.stub.StartJob(slow_job("refused-writes"))
    wait_for_job(trainer.stub, blocker.job_id, lambda j: j.progress.step > 0, 30, "to run")
    queued = trainer.stub.StartJob(mlp_job("queued-then-cancelled"))
    failures = publish_failures()
    trainer.client.config_set("maxmemory", 1)  # full: every write fails at once, reads work
    try:
        assert (
            trainer.stub.CancelJob(pb.CancelJobRequest(job_id=queued.job_id), timeout=30).state
            == pb.JOB_STATE_CANCELLED
        )
        assert (
            trainer.stub.CancelJob(pb.CancelJobRequest(job_id=blocker.job_id), timeout=30).state
            == pb.JOB_STATE_CANCELLING
        )
        wait_until(lambda: publish_failures() > failures, "the final checkpoint to be refused", timeout=10)
        assert get_job(trainer.stub, queued.job_id).state == pb.JOB_STATE_CANCELLED
    finally:
        trainer.client.config_set("maxmemory", 0)

    done = wait_finished(trainer.stub, blocker.job_id, timeout=30)
    assert done.state == pb.JOB_STATE_CANCELLED, done.error
    assert done.last_published_version == trainer.store.latest_version("refused-writes")
    assert trainer.store.latest("refused-writes").meta.step == done.progress.step
    for job_id in (queued.job_id, blocker.job_id):
        wait_until(
            lambda job_id=job_id: trainer.jobs.get(job_id).state == JobState.CANCELLED,
            f"the record of {job_id} to be saved as CANCELLED",
            timeout=15,
        )


def test_the_publisher_backs_off_while_redis_refuses_writes(trainer):
    job = trainer.stub.StartJob(slow_job("every-step", every_steps=1))
    wait_for_job(trainer.stub, job.job_id, lambda j: j.last_published_version >= 1, 30, "a first checkpoint")
    trainer.client.config_set("maxmemory", 1)
    try:
        failures, step = publish_failures(), get_job(trainer.stub, job.job_id).progress.step
        # 2,000 steps, each with a new snapshot to publish; the publisher retries after 0.2 s,
        # 0.4 s, 0.8 s, ... whatever arrives meanwhile (the newest snapshot waits its turn).
        wait_for_job(trainer.stub, job.job_id, lambda j: j.progress.step >= step + 2000, 30, "2,000 steps")
        assert 1 <= publish_failures() - failures <= 10
    finally:
        trainer.client.config_set("maxmemory", 0)
    trainer.stub.CancelJob(pb.CancelJobRequest(job_id=job.job_id))
    done = wait_finished(trainer.stub, job.job_id, timeout=30)
    assert done.state == pb.JOB_STATE_CANCELLED, done.error
    assert trainer.store.latest("every-step").meta.step == done.progress.step


# ---------------------------------------------------------------- datasets


def test_an_uploaded_dataset_is_listed_and_trained_on(trainer):
    info = trainer.stub.UploadDataset(upload("small-digits", digits_arrays(400, 100)), timeout=30)
    assert (
        info.name,
        list(info.input_shape),
        info.num_classes,
        info.train_size,
        info.test_size,
        info.source,
    ) == ("small-digits", [1, 8, 8], 10, 400, 100, "upload")
    listed = {d.name: d for d in trainer.stub.ListDatasets(pb.ListDatasetsRequest(), timeout=10).datasets}
    assert listed["small-digits"] == info and listed["digits"].source == "builtin"

    job = trainer.stub.StartJob(mlp_job("on-upload", epochs=2, dataset="small-digits"))
    done = wait_finished(trainer.stub, job.job_id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.progress.steps_total == 2 * -(-400 // 32)
    assert list_checkpoints(trainer.stub, "on-upload")[0].dataset == "small-digits"


def test_uploads_that_cannot_be_stored_are_refused_and_leave_nothing(start_trainer):
    trainer = start_trainer(max_upload_bytes=150_000)
    stub = trainer.stub

    too_big = rpc_error(stub.UploadDataset, upload("too-big", digits_arrays(DIGITS_TRAIN, 100)))
    assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, too_big.details()
    assert "150,000" in too_big.details()

    partial = rpc_error(
        stub.UploadDataset, upload("partial", digits_arrays(400, 100), drop_last_piece_of="x_test")
    )
    assert partial.code() == grpc.StatusCode.INVALID_ARGUMENT, partial.details()
    assert "incomplete" in partial.details() and "x_test" in partial.details()

    headless = rpc_error(stub.UploadDataset, iter(list(upload("headless", digits_arrays(10, 10)))[1:]))
    assert headless.code() == grpc.StatusCode.INVALID_ARGUMENT and "header" in headless.details()

    builtin = rpc_error(stub.UploadDataset, upload("digits", digits_arrays(400, 100), overwrite=True))
    assert builtin.code() == grpc.StatusCode.INVALID_ARGUMENT and "built-in" in builtin.details()

    assert list(trainer.client.scan_iter("tandem:dataset:*")) == []
    assert [d.name for d in stub.ListDatasets(pb.ListDatasetsRequest(), timeout=10).datasets] == ["digits"]
    error = rpc_error(stub.StartJob, mlp_job("x", dataset="partial"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_an_upload_to_a_taken_name_needs_overwrite(trainer):
    trainer.stub.UploadDataset(upload("taken", digits_arrays(400, 100)), timeout=30)
    taken = rpc_error(trainer.stub.UploadDataset, upload("taken", digits_arrays(300, 50)))
    assert taken.code() == grpc.StatusCode.ALREADY_EXISTS and "overwrite" in taken.details()
    assert trainer.stub.StartJob(mlp_job("before", epochs=1, dataset="taken")).progress.epochs == 1

    replaced = trainer.stub.UploadDataset(upload("taken", digits_arrays(300, 50), overwrite=True), timeout=30)
    assert (replaced.train_size, replaced.test_size) == (300, 50)
    job = trainer.stub.StartJob(mlp_job("after", epochs=1, dataset="taken"))
    done = wait_finished(trainer.stub, job.job_id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.progress.steps_total == -(-300 // 32)  # trained on the new arrays


def test_of_racing_uploads_to_a_new_name_exactly_one_is_stored_whole(trainer):
    def attempt(train_size: int):
        try:
            return trainer.stub.UploadDataset(upload("contested", digits_arrays(train_size, 50)), timeout=30)
        except grpc.RpcError as error:
            return error.code()

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(attempt, [100, 200, 300, 400]))
    stored = [r for r in results if isinstance(r, pb.DatasetInfo)]
    assert len(stored) == 1 and results.count(grpc.StatusCode.ALREADY_EXISTS) == 3, results
    listed = {d.name: d for d in trainer.stub.ListDatasets(pb.ListDatasetsRequest(), timeout=10).datasets}
    assert listed["contested"] == stored[0]


# ---------------------------------------------------------------- listing and idempotency


def test_list_jobs_pages_through_every_job_newest_first_and_filters(trainer):
    blocker = trainer.stub.StartJob(slow_job("alpha"))
    wait_for_job(trainer.stub, blocker.job_id, lambda j: j.state == pb.JOB_STATE_RUNNING, 30, "to run")
    queued = [trainer.stub.StartJob(mlp_job("alpha" if i % 2 else "beta")).job_id for i in range(101)]
    newest_first = [*reversed(queued), blocker.job_id]

    pages, token = [], ""
    while True:
        page = trainer.stub.ListJobs(pb.ListJobsRequest(page_size=40, page_token=token), timeout=10)
        pages.append([j.job_id for j in page.jobs])
        if not (token := page.next_page_token):
            break
    assert [len(p) for p in pages] == [40, 40, 22]
    assert [job_id for p in pages for job_id in p] == newest_first

    first = trainer.stub.ListJobs(pb.ListJobsRequest(states=[pb.JOB_STATE_QUEUED]), timeout=10)
    assert len(first.jobs) == 100 and first.next_page_token  # the default page size
    assert [j.job_id for j in all_jobs(trainer.stub, states=[pb.JOB_STATE_QUEUED])] == newest_first[:-1]
    assert [j.job_id for j in all_jobs(trainer.stub, states=[pb.JOB_STATE_RUNNING])] == [blocker.job_id]
    assert len(all_jobs(trainer.stub, states=[pb.JOB_STATE_RUNNING, pb.JOB_STATE_QUEUED])) == 102
    assert all_jobs(trainer.stub, states=[pb.JOB_STATE_SUCCEEDED]) == []
    beta = [j.job_id for j in all_jobs(trainer.stub, model_name="beta")]
    assert beta == [job_id for job_id in newest_first if job_id in queued[0::2]]
    assert len(all_jobs(trainer.stub, model_name="alpha", states=[pb.JOB_STATE_QUEUED])) == 50

    error = rpc_error(trainer.stub.ListJobs, pb.ListJobsRequest(page_token="not-a-token"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in error.details()


def test_a_repeated_request_id_returns_the_same_job(trainer):
    first = trainer.stub.StartJob(mlp_job("idempotent", epochs=1, request_id="req-1"))
    again = trainer.stub.StartJob(mlp_job("idempotent", epochs=1, request_id="req-1"))
    other = trainer.stub.StartJob(mlp_job("idempotent", epochs=1, request_id="req-2"))
    assert again.job_id == first.job_id != other.job_id
    raced: list[str] = []
    with ThreadPoolExecutor(8) as pool:  # retries racing each other, in 5 rounds
        for round_ in range(5):
            request = mlp_job("idempotent", epochs=1, request_id=f"raced-{round_}")
            calls = [pool.submit(trainer.stub.StartJob, request, timeout=30) for _ in range(8)]
            job_ids = {call.result().job_id for call in calls}
            assert len(job_ids) == 1, job_ids
            raced += job_ids
    started = [first.job_id, other.job_id, *raced]
    assert sorted(j.job_id for j in all_jobs(trainer.stub)) == sorted(started)
    for job_id in started:
        assert wait_finished(trainer.stub, job_id).state == pb.JOB_STATE_SUCCEEDED
    after = trainer.stub.StartJob(mlp_job("idempotent", epochs=1, request_id="req-1"))
    assert after.job_id == first.job_id and after.state == pb.JOB_STATE_SUCCEEDED


# ---------------------------------------------------------------- health, reflection, metrics


def test_health_reports_serving_for_the_server_and_the_trainer_service(idle_trainer):
    health = health_pb2_grpc.HealthStub(idle_trainer.channel)
    for service in ("", "tandem.v1.Trainer"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    error = rpc_error(health.Check, health_pb2.HealthCheckRequest(service="tandem.v1.Nothing"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_trainer_service(idle_trainer):
    database = ProtoReflectionDescriptorDatabase(idle_trainer.channel)
    services = set(database.get_services())
    assert {"tandem.v1.Trainer", "grpc.health.v1.Health"} <= services
    trainer = DescriptorPool(database).FindServiceByName("tandem.v1.Trainer")
    assert {m.name for m in trainer.methods} == {
        "StartJob",
        "GetJob",
        "ListJobs",
        "WatchJob",
        "CancelJob",
        "ListCheckpoints",
        "ListDatasets",
        "UploadDataset",
    }
    assert trainer.methods_by_name["StartJob"].input_type.full_name == "tandem.v1.StartJobRequest"


def test_the_metrics_endpoint_serves_job_states_and_publish_times(start_trainer):
    port = free_loopback_port()
    trainer = start_trainer(metrics_port=port, metrics_address="127.0.0.1")
    job = trainer.stub.StartJob(mlp_job("metered", epochs=1))
    assert wait_finished(trainer.stub, job.job_id).state == pb.JOB_STATE_SUCCEEDED
    queued = trainer.stub.StartJob(slow_job("metered-slow"))
    trainer.stub.CancelJob(pb.CancelJobRequest(job_id=queued.job_id))
    wait_finished(trainer.stub, queued.job_id)

    samples = scrape_metrics(port)
    assert job_states(samples) == {"SUCCEEDED": 1, "CANCELLED": 1}
    assert samples[("tandem_trainer_checkpoint_publish_seconds_count", ())] >= 2
    assert samples[("tandem_trainer_checkpoint_publish_seconds_sum", ())] > 0

    # A trainer started again in the same process, on the same port, serves metrics again.
    trainer.close()
    again = start_trainer(metrics_port=port, metrics_address="127.0.0.1")
    assert job_states(scrape_metrics(port)) == {"SUCCEEDED": 1, "CANCELLED": 1}
    again.close()


def job_states(samples: dict[tuple[str, tuple], float]) -> dict[str, float]:
    """The tandem_trainer_jobs gauge by state, from scrape_metrics."""
    return {
        dict(labels)["state"]: value
        for (name, labels), value in samples.items()
        if name == "tandem_trainer_jobs"
    }


def test_a_slow_watcher_loses_only_old_step_events():
    from trainer_svc.events import EpochDone, EventHub, StepProgress

    hub = EventHub(capacity=3)
    watcher = hub.subscribe("job")
    hub.publish("job", EpochDone({"epoch": 1}))
    for step in range(1, 11):
        hub.publish("job", StepProgress(1, step, 10, 0.5, 0.5, 100.0))
    hub.publish("job", EpochDone({"epoch": 2}))
    received = []
    while (event := watcher.next(timeout=0)) is not None:
        received.append(event)
    assert [type(e).__name__ for e in received] == [
        "EpochDone",
        "StepProgress",
        "StepProgress",
        "StepProgress",
        "EpochDone",
    ]
    assert [e.step for e in received if isinstance(e, StepProgress)] == [8, 9, 10]


def test_checkpoints_short_of_replicas_are_counted(start_trainer, monkeypatch):
    """REDIS_MIN_REPLICAS_ACK=1 on a Redis without replicas: every publish is stored and counted."""
    monkeypatch.setenv("REDIS_MIN_REPLICAS_ACK", "1")
    monkeypatch.setenv("REDIS_REPLICA_ACK_TIMEOUT_MS", "20")
    before = metric_value("tandem_trainer_checkpoints_unreplicated_total")
    trainer = start_trainer()
    job = trainer.stub.StartJob(mlp_job("unreplicated", epochs=2, every_epoch=True))
    done = wait_finished(trainer.stub, job.job_id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    published = len(list_checkpoints(trainer.stub, "unreplicated"))
    assert published >= 2
    assert metric_value("tandem_trainer_checkpoints_unreplicated_total") - before == published
