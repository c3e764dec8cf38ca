"""The compose stack end to end: the scenarios of a deployment, from this machine.

Everything goes through the ports the stack publishes on 127.0.0.1 (found
through the Docker SDK, and found again after a container restarts: an
ephemeral host port may change), with the project's own clients: the
TrainerClient, the generated tandem.v1.Inference stubs, the `tandem` CLI,
and tritonclient for the Open Inference Protocol; all over TLS, trusting
the CA the stack made, with the tokens it made for the host. Containers are controlled with the Docker
SDK. Every wait is bounded: gRPC deadlines, or a deadline on a condition.

Each test trains a model of its own name, so the order of the tests does not
matter; one that stops a container starts it again.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from shared.client import Connection
from shared.rpc.convert import from_tensor, job_state_name
from shared.security.tls import ClientTLS
from tests.compose.clients import (
    CALL_TIMEOUT,
    READY_TIMEOUT,
    Inference,
    JobWatch,
    PredictLoop,
    connect_trainer,
    crash,
    deadline_loop,
    digits,
    redis_cli,
    requests_served,
    wait_until_serving,
)
from tests.compose.stack import INFER_PORT, REPO

pytestmark = pytest.mark.compose

LONG_EPOCHS = 40  # a job long enough to be interrupted mid-way (a few seconds per 10 epochs)
# A job that outlives a Redis restart: the restart comes after 100 of its 510 steps. It runs
# beside a predict loop on both replicas, on a machine that may be shared: shorter than LONG_EPOCHS.
OUTAGE_EPOCHS = 10


@pytest.fixture
def trainer(healthy_stack):
    client = connect_trainer(healthy_stack)
    yield client
    client.close()


@pytest.fixture(scope="module")
def small_model(stack):
    """A digits CNN trained for two epochs, for the tests that only need something to serve."""
    with connect_trainer(stack) as client:
        job = client.start_job(
            "compose-small", "digits", preset="digits-cnn", hyperparameters={"epochs": 2, "seed": 5}
        )
        watch = JobWatch(client, job.job_id)
        final = watch.finished()
    assert job_state_name(final.state) == "SUCCEEDED", final.error
    return final


# ---------------------------------------------------------------- 1. train and predict


def test_train_digits_and_predict_the_held_out_set(healthy_stack, trainer):
    model = "compose-digits"
    job = trainer.start_job(model, "digits", preset="digits-cnn", hyperparameters={"epochs": 8, "seed": 7})
    watch = JobWatch(trainer, job.job_id)
    final = watch.finished()
    assert job_state_name(final.state) == "SUCCEEDED", final.error
    checkpoints = [checkpoint for _, checkpoint in watch.of_kind("checkpoint")]
    assert checkpoints and checkpoints[-1].version == final.last_published_version
    assert len(watch.of_kind("epoch")) == 8
    listed = trainer.list_checkpoints(model)
    assert listed[0].version == final.last_published_version and listed[0].latest

    data = digits()
    replica = Inference(healthy_stack, healthy_stack.infer_addresses()[0])
    try:
        response = replica.predict(model, data.x_test)
    finally:
        replica.close()
    assert response.version == final.last_published_version
    probabilities = from_tensor(response.probabilities, allowed_dtypes=("float32",), field="probabilities")
    assert probabilities.shape == (len(data.y_test), 10)
    accuracy = float(np.mean(np.asarray(response.classes) == data.y_test))
    assert accuracy >= 0.97, f"held-out accuracy {accuracy:.2%}"
    # The same weights as the trainer evaluated: its last reported test accuracy.
    assert accuracy == pytest.approx(final.last_metrics.test_accuracy, abs=1e-6)


# ---------------------------------------------------------------- 2. replicas agree after a publish


def test_both_replicas_serve_the_latest_version_after_a_publish(healthy_stack, trainer):
    model = "compose-replicas"
    sample = digits().x_test[:4]
    replicas = [Inference(healthy_stack, address) for address in healthy_stack.infer_addresses()]
    assert len(replicas) == 2
    try:
        first = JobWatch(
            trainer,
            trainer.start_job(
                model, "digits", preset="digits-cnn", hyperparameters={"epochs": 1, "seed": 1}
            ).job_id,
        ).finished()
        assert job_state_name(first.state) == "SUCCEEDED", first.error
        # Both replicas load the model on first use and follow it from then on.
        assert [r.predict(model, sample).version for r in replicas] == [first.last_published_version] * 2

        second = JobWatch(
            trainer,
            trainer.start_job(
                model, "digits", preset="digits-cnn", hyperparameters={"epochs": 2, "seed": 2}
            ).job_id,
        ).finished()
        assert job_state_name(second.state) == "SUCCEEDED", second.error
        assert second.last_published_version > first.last_published_version
        for replica in replicas:  # hot reloaded: announced over Pub/Sub, or caught up by the poll
            wait_until_serving(replica, model, second.last_published_version, sample)
        answers = [replica.predict(model, sample) for replica in replicas]
        assert {a.version for a in answers} == {second.last_published_version}
        assert list(answers[0].classes) == list(answers[1].classes)
    finally:
        for replica in replicas:
            replica.close()


# ---------------------------------------------------------------- 3. Redis restarts mid-training


def test_redis_restart_mid_training(healthy_stack, trainer):
    model = "compose-redis-restart"
    sample = digits().x_test[:4]
    job = trainer.start_job(
        model,
        "digits",
        preset="digits-cnn",
        hyperparameters={"epochs": OUTAGE_EPOCHS, "seed": 3},
        every_steps=100,
        every_epoch=False,
    )
    watch = JobWatch(trainer, job.job_id)
    watch.wait_for(lambda e: e.HasField("checkpoint"), "a first checkpoint")
    replicas = [Inference(healthy_stack, address) for address in healthy_stack.infer_addresses()]
    try:
        for replica in replicas:  # loaded before the outage
            replica.predict(model, sample)
        with PredictLoop([functools.partial(r.predict, model, sample) for r in replicas]) as loop:
            loop.wait_successes(10)
            redis = healthy_stack.container("redis")
            steps_before = max((step.step for _, step in watch.of_kind("step")), default=0)
            outage_start = time.monotonic()
            redis.restart(timeout=10)  # SIGTERM (Redis saves and exits), then a new start
            outage_end = time.monotonic()  # the server is starting again
            final = watch.finished()
            loop.wait_successes(loop.successes() + 10)
        assert job_state_name(final.state) == "SUCCEEDED", final.error
        # Mid-training: the job had steps to go when Redis went down, and ended after it was back.
        assert final.progress.step == final.progress.steps_total > 0
        assert steps_before < final.progress.steps_total
        finished_at = watch.of_kind("finished")[0][0]
        assert finished_at > outage_end
        assert any(at > outage_end for at, _ in watch.of_kind("checkpoint")), (
            "no checkpoint was published to the restarted Redis"
        )
        # Redis kept its data (append-only file on its volume): versions counted on across the
        # restart instead of starting from 1 again.
        versions = [checkpoint.version for _, checkpoint in watch.of_kind("checkpoint")]
        assert versions == list(range(1, len(versions) + 1)), versions
        healthy_stack.wait_healthy()  # Redis included, by its own health check
        # Inference answered throughout, the outage included, and never failed.
        assert loop.failures() == []
        assert len(loop.between(outage_start, outage_end)) > 0
        # And it catches up with what was published after the restart.
        for replica in replicas:
            wait_until_serving(replica, model, final.last_published_version, sample)
    finally:
        for replica in replicas:
            replica.close()


# ---------------------------------------------------------------- 4. the trainer dies mid-job


def test_killed_trainer_restarts_and_resumes_the_job(healthy_stack, trainer):
    model = "compose-trainer-kill"
    job = trainer.start_job(
        model,
        "digits",
        preset="digits-cnn",
        hyperparameters={"epochs": LONG_EPOCHS, "seed": 4},
        every_steps=50,
        every_epoch=False,
    )
    watch = JobWatch(trainer, job.job_id)
    watch.wait_for(lambda e: e.HasField("checkpoint") and e.checkpoint.version >= 2, "a second checkpoint")
    container = healthy_stack.container("trainer")
    restarts_before = container.attrs["RestartCount"]
    crash(container, "trainer_svc")
    watch.wait_ended(CALL_TIMEOUT)  # the stream breaks with the process
    assert not watch.of_kind("finished"), "the job ended before the trainer was killed"
    seen = {checkpoint.version: checkpoint.step for _, checkpoint in watch.of_kind("checkpoint")}

    for _ in deadline_loop("the restart policy to bring the trainer back", READY_TIMEOUT, 0.25):
        container.reload()
        if container.attrs["RestartCount"] > restarts_before and container.status == "running":
            break
    with connect_trainer(healthy_stack) as client:  # its port may have changed
        resumed = JobWatch(client, job.job_id)
        final = resumed.finished()
    assert job_state_name(final.state) == "SUCCEEDED", final.error
    assert final.restarts == 1

    # It resumed from its last checkpoint, not from scratch.
    logs = container.logs().decode(errors="replace")
    match = re.search(rf"event=job_resumable job={job.job_id} restarts=1 from_version=(\d+)", logs)
    assert match, "the restarted trainer did not log the job as resumable"
    from_version = int(match.group(1))
    assert from_version >= max(seen)
    first_step = min(step.step for _, step in resumed.of_kind("step"))
    if from_version in seen:
        assert first_step > seen[from_version], (first_step, seen)
    assert first_step > 1
    assert all(c.version > from_version for _, c in resumed.of_kind("checkpoint"))
    steps_per_epoch = resumed.of_kind("step")[-1][1].steps_per_epoch
    assert final.progress.step == final.progress.steps_total == LONG_EPOCHS * steps_per_epoch
    assert [e.epoch for e in final.history] == list(range(1, LONG_EPOCHS + 1))


# ---------------------------------------------------------------- 5. one replica stops under load

# The client's failover: one channel over both replicas' ports, balanced round robin (a
# replica that goes away leaves the pick list once its connection drops), and a retry for
# the call that met the closing replica (Predict is idempotent): on UNAVAILABLE, and on
# CANCELLED, which is what gRPC's server answers to calls that arrived but had not reached a
# handler when its shutdown began (grpc/grpc#41785). A call this client cancels itself is
# never retried: retry policies apply to statuses from the server only.
FAILOVER_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "tandem.v1.Inference"}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
            },
        }
    ],
}


def test_one_replica_stops_under_a_client_loop(healthy_stack, small_model):
    model = small_model.model_name
    sample = digits().x_test[:4]
    stopped, survivor = healthy_stack.containers("infer", all=False)
    addresses = [healthy_stack.published(c, INFER_PORT) for c in (stopped, survivor)]
    client = Inference(
        healthy_stack,
        "ipv4:" + ",".join(addresses),
        options=[
            ("grpc.service_config", json.dumps(FAILOVER_CONFIG)),
            ("grpc.enable_retries", 1),
            # One channel over two addresses: check the name the certificates have.
            ("grpc.ssl_target_name_override", "localhost"),
        ],
    )
    try:
        with PredictLoop([lambda: client.predict(model, sample)], interval=0.01) as loop:
            loop.wait_successes(40)
            served_before = [requests_served(healthy_stack, c, model) for c in (stopped, survivor)]
            assert all(count > 0 for count in served_before), f"not balanced: {served_before}"
            stopped.stop(timeout=15)  # SIGTERM: graceful, calls in flight finish
            stopped.reload()
            assert stopped.status == "exited"
            after_stop = loop.successes()
            loop.wait_successes(after_stop + 60)
        assert loop.failures() == []
        assert requests_served(healthy_stack, survivor, model) >= served_before[1] + 60
        assert {version for _, ok, version in loop.outcomes} == {str(small_model.last_published_version)}
    finally:
        client.close()
        stopped.reload()
        if stopped.status != "running":
            stopped.start()
    healthy_stack.wait_healthy()


# ---------------------------------------------------------------- 6. the Open Inference Protocol


def test_tritonclient_gets_predictions_from_the_stack(healthy_stack, small_model):
    import tritonclient.grpc as triton

    model, version = small_model.model_name, small_model.last_published_version
    x = digits().x_test[:16].astype(np.float32)
    address = healthy_stack.infer_addresses()[-1]
    client = triton.InferenceServerClient(url=address, ssl=True, root_certificates=str(healthy_stack.ca_file))
    token = {"authorization": f"Bearer {healthy_stack.token('predict')}"}
    replica = Inference(healthy_stack, address)
    try:
        assert client.is_server_live(headers=token, client_timeout=CALL_TIMEOUT)
        inputs = triton.InferInput("input", list(x.shape), "FP32")
        inputs.set_data_from_numpy(x)
        result = client.infer(
            model,
            [inputs],
            outputs=[triton.InferRequestedOutput("probabilities"), triton.InferRequestedOutput("classes")],
            headers=token,
            client_timeout=CALL_TIMEOUT,
        )
        assert result.get_response().model_version == str(version)
        probabilities, classes = result.as_numpy("probabilities"), result.as_numpy("classes")
        assert probabilities.shape == (16, 10) and classes.shape == (16,)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
        assert client.is_server_ready(headers=token, client_timeout=CALL_TIMEOUT)
        assert client.is_model_ready(model, headers=token, client_timeout=CALL_TIMEOUT)
        metadata = client.get_model_metadata(model, headers=token, client_timeout=CALL_TIMEOUT)
        assert [i.name for i in metadata.inputs] == ["input"]
        # The same answer as Tandem's own API on the same replica.
        own = replica.predict(model, x)
        assert list(classes) == list(own.classes)
        np.testing.assert_allclose(
            probabilities,
            from_tensor(own.probabilities, allowed_dtypes=("float32",), field="probabilities"),
            rtol=1e-5,
            atol=1e-7,
        )
    finally:
        client.close()
        replica.close()


def test_tritonclient_http_gets_the_same_predictions_from_every_replica(healthy_stack, small_model):
    """The HTTP/REST door of each replica, over HTTPS with the stack's CA and a predict token."""
    import tritonclient.http as triton_http

    model, version = small_model.model_name, small_model.last_published_version
    x = digits().x_test[:16].astype(np.float32)
    token = {"Authorization": f"Bearer {healthy_stack.token('predict')}"}
    answers = []
    for address in healthy_stack.infer_http_addresses():
        client = triton_http.InferenceServerClient(
            url=address,
            ssl=True,
            # geventhttpclient builds its context with cafile=ssl_options["ca_certs"] (certifi's
            # bundle unless given): the stack's CA goes there, not into a context factory.
            ssl_options={"ca_certs": str(healthy_stack.ca_file)},
            connection_timeout=CALL_TIMEOUT,
            network_timeout=CALL_TIMEOUT,
        )
        try:
            assert client.is_server_live(headers=token)
            inputs = triton_http.InferInput("input", list(x.shape), "FP32")
            inputs.set_data_from_numpy(x, binary_data=True)
            result = client.infer(model, [inputs], headers=token)
            assert result.get_response()["model_version"] == str(version)
            answers.append(result.as_numpy("probabilities"))
            # Ready once it serves here: without INFER_MODELS, a model loads on its first request.
            assert client.is_model_ready(model, headers=token)
        finally:
            client.close()
    assert len(answers) == len(healthy_stack.infer_addresses()) >= 2
    for probabilities in answers[1:]:
        np.testing.assert_allclose(probabilities, answers[0], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- 7. security: TLS, tokens, Redis users


def test_the_stack_refuses_plaintext_and_callers_without_the_right_token(healthy_stack, small_model):
    trainer, infer = healthy_stack.trainer_address(), healthy_stack.infer_addresses()[0]
    listing = "/tandem.v1.Trainer/ListJobs"
    with grpc.insecure_channel(trainer) as plaintext, pytest.raises(grpc.RpcError) as caught:
        plaintext.unary_unary(listing)(b"", timeout=CALL_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    for connection, expected in (
        (Connection(ClientTLS(ca=healthy_stack.ca_file)), grpc.StatusCode.UNAUTHENTICATED),
        (healthy_stack.connection("predict"), grpc.StatusCode.PERMISSION_DENIED),
    ):
        with connection.channel(trainer) as channel, pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(listing)(b"", timeout=CALL_TIMEOUT)
        assert caught.value.code() == expected, caught.value.details()
    replica = Inference(healthy_stack, infer)  # the predict token on inference: answered
    try:
        assert (
            replica.predict(small_model.model_name, digits().x_test[:1]).version
            == small_model.last_published_version
        )
    finally:
        replica.close()


def test_the_cli_drives_the_stack_over_tls_with_a_token_file(healthy_stack, small_model):
    tandem = [sys.executable, "-m", "shared.cli"]
    tls = ["--tls-ca", str(healthy_stack.ca_file)]
    tokens = healthy_stack.secrets_dir / "clients"
    jobs = subprocess.run(
        [
            *tandem,
            "jobs",
            "list",
            "--trainer",
            healthy_stack.trainer_address(),
            *tls,
            "--token-file",
            str(tokens / "admin.token"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert jobs.returncode == 0, jobs.stderr
    assert small_model.job_id in jobs.stdout
    predicted = subprocess.run(
        [
            *tandem,
            "predict",
            "--server",
            healthy_stack.infer_addresses()[0],
            *tls,
            "--token-file",
            str(tokens / "predict.token"),
            "--model-name",
            small_model.model_name,
            "--dataset",
            "digits",
            "--limit",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert predicted.returncode == 0, predicted.stderr
    assert f"version {small_model.last_published_version}" in predicted.stdout


def test_its_redis_refuses_writes_from_the_inference_user(healthy_stack, small_model):
    redis = healthy_stack.container("redis")
    key = f"tandem:model:{small_model.model_name}:latest"

    latest = redis_cli(healthy_stack, "redis", "infer", "GET", key)
    assert latest == str(small_model.last_published_version)
    for command in (
        ("SET", key, "999"),
        ("DEL", key),
        ("PUBLISH", "tandem:announcements", "{}"),
        ("KEYS", "tandem:job:*"),
    ):
        assert "NOPERM" in redis_cli(healthy_stack, "redis", "infer", *command), command
    assert redis_cli(healthy_stack, "redis", "infer", "GET", key) == latest
    assert (
        "NOAUTH"
        in redis.exec_run(
            ["redis-cli", "--tls", "--cacert", "/run/tandem/public/ca.crt", "-h", "localhost", "GET", key]
        )[1].decode()
    )
