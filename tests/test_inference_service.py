"""The inference service end to end: real gRPC servers on 127.0.0.1 against a real Redis.

No mocks: checkpoints are published with the checkpoint store, calls go
through the generated stubs, and answers are compared with the NumPy core's
own forward pass on the same weights. Waits are bounded polling loops or
gRPC deadlines. The Open Inference Protocol side is in test_kserve.py.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from infer_svc.config import InferConfig
from shared.checkpoints import checkpoint
from shared.checkpoints.checkpoint import CheckpointMeta
from shared.checkpoints.redis_client import connect
from shared.checkpoints.store import CheckpointStore
from shared.embedded.redis_server import EmbeddedRedis, free_loopback_port
from shared.rpc.stubs import grpc_service_pb2, tandem_common_pb2
from shared.rpc.stubs import tandem_inference_pb2 as pb
from tests.helpers import metric_value, scrape_metrics, wait_until
from tests.inference_harness import (
    DEADLINE,
    NAME,
    Inference,
    assert_close,
    core_probabilities,
    digits_model,
    infer_config,
    probabilities,
    publish,
    samples,
)

REPO = Path(__file__).resolve().parents[1]
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND


def status_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


# ---------------------------------------------------------------- settings


def test_settings_come_from_the_environment(monkeypatch):
    for name in [n for n in os.environ if n.startswith("INFER_")]:
        monkeypatch.delenv(name)
    defaults = InferConfig()
    assert (defaults.listen, defaults.models, defaults.pinned) == ("127.0.0.1:50052", (), {})
    assert (defaults.batching, defaults.max_queue_delay_ms, defaults.metrics_port) == (True, 0.0, 9102)

    monkeypatch.setenv("INFER_MODELS", " digits, other ,")
    monkeypatch.setenv("INFER_PINNED", "digits=3,other=7")
    monkeypatch.setenv("INFER_BATCHING", "false")
    configured = InferConfig()
    assert (configured.models, configured.pinned, configured.batching) == (
        ("digits", "other"),
        {"digits": 3, "other": 7},
        False,
    )

    for name, value, message in [
        ("INFER_PINNED", "digits", "not MODEL=VERSION"),
        ("INFER_PINNED", "digits=0", "not MODEL=VERSION"),
        ("INFER_MODELS", "a b", "model_name must be"),
        ("INFER_MAX_ROWS", "many", "INFER_MAX_ROWS='many'"),
        ("INFER_MAX_CONNECTION_AGE_SECONDS", "-1", "INFER_MAX_CONNECTION_AGE_SECONDS=-1.0: expected 0"),
        ("INFER_MAX_CONNECTION_AGE_SECONDS", "inf", "INFER_MAX_CONNECTION_AGE_SECONDS=inf: expected 0"),
        ("INFER_MAX_CONNECTION_AGE_SECONDS", "nan", "INFER_MAX_CONNECTION_AGE_SECONDS=nan: expected 0"),
        ("INFER_MAX_CONNECTION_AGE_SECONDS", "0.001", "=0.001: expected 0 .* or 1 to 2147483 seconds"),
        ("INFER_MAX_CONNECTION_AGE_SECONDS", "3e6", "=3000000.0: expected 0 .* or 1 to 2147483 seconds"),
    ]:
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=message):
            InferConfig()
        monkeypatch.delenv(name)


def test_a_connection_past_its_max_age_is_closed_and_the_next_call_reconnects(checkpoints, start_inference):
    """What lets a scale-out behind `dns:///` get traffic: the server closes old connections
    (GOAWAY), the client's channel goes IDLE, and its next call connects (and resolves) again."""
    publish(checkpoints, seed=0)
    inference = start_inference(max_connection_age_seconds=1.0)
    states: queue.Queue[grpc.ChannelConnectivity] = queue.Queue()
    inference.channel.subscribe(states.put)
    assert inference.served_version() == 1  # connects: READY
    for wanted in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.IDLE):  # in this order
        while states.get(timeout=DEADLINE) != wanted:  # bounded: queue.Empty fails the test
            pass
    assert inference.served_version() == 1  # a new connection answers


# ---------------------------------------------------------------- answers


def test_predictions_equal_the_cores_forward_pass(checkpoints, start_inference):
    version, model = publish(checkpoints, seed=0)
    inference = start_inference()
    x = samples(7)

    response = inference.predict(x, top_k=3)

    expected = core_probabilities(model, x)
    assert (response.model_name, response.version) == (NAME, version)
    assert response.probabilities.dtype == "float32"
    assert_close(probabilities(response), expected)
    assert list(response.classes) == list(expected.argmax(axis=1))
    top = np.argsort(-expected, axis=1, kind="stable")[:, :3]
    assert [list(row.classes) for row in response.top_k] == top.tolist()
    assert_close(
        np.array([list(row.probabilities) for row in response.top_k]),
        np.take_along_axis(expected, top, axis=1),
    )
    # float64 inputs and flat samples are accepted too, with the same answers
    assert_close(probabilities(inference.predict(x.astype(np.float64).reshape(7, -1))), expected)


def test_model_metadata_and_list(checkpoints, start_inference):
    publish(checkpoints, seed=0)
    version, model = publish(checkpoints, seed=1)
    inference = start_inference()

    metadata = inference.stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name=NAME))

    assert (metadata.model_name, metadata.version) == (NAME, version)
    assert list(metadata.available_versions) == [1, 2]
    assert (list(metadata.input_shape), metadata.num_classes, metadata.dtype) == ([1, 8, 8], 10, "float32")
    assert json.loads(metadata.spec_json) == model.spec
    assert (metadata.checkpoint.version, metadata.checkpoint.latest) == (2, True)
    assert metadata.checkpoint.dataset == "digits" and metadata.checkpoint.size_bytes > 0
    older = inference.stub.GetModelMetadata(pb.GetModelMetadataRequest(model_name=NAME, version=1))
    assert (older.version, older.checkpoint.version, older.checkpoint.latest) == (1, 1, False)
    listed = inference.stub.ListModels(pb.ListModelsRequest())
    assert [(m.model_name, m.version) for m in listed.models] == [(NAME, 2)]


def test_a_request_for_an_older_version(checkpoints, start_inference):
    _, old = publish(checkpoints, seed=0)
    _, new = publish(checkpoints, seed=1)
    inference = start_inference()
    x = samples(3)

    answer_old = inference.predict(x, version=1)
    answer_latest = inference.predict(x)

    assert (answer_old.version, answer_latest.version) == (1, 2)
    assert_close(probabilities(answer_old), core_probabilities(old, x))
    assert_close(probabilities(answer_latest), core_probabilities(new, x))


def test_any_model_asked_for_loads_on_first_use(checkpoints, start_inference):
    publish(checkpoints, seed=0, name="other")
    inference = start_inference(models=())

    assert inference.predict(samples(1), name="other").version == 1
    assert status_of(lambda: inference.predict(samples(1), name="missing")) == NOT_FOUND


def test_concurrent_first_requests_load_the_model_once(checkpoints, start_inference):
    publish(checkpoints, seed=0, name="crowd")
    inference = start_inference(models=())
    clients = 16
    start = threading.Barrier(clients)

    def first_request(_):
        start.wait(timeout=DEADLINE)
        return inference.predict(samples(1), name="crowd").version

    with ThreadPoolExecutor(clients) as pool:
        assert list(pool.map(first_request, range(clients))) == [1] * clients
    assert metric_value("tandem_infer_model_loads_total", model="crowd") == 1


def test_only_configured_models_serve(checkpoints, start_inference):
    publish(checkpoints, seed=0)
    publish(checkpoints, seed=1, name="other")
    inference = start_inference(models=(NAME,))

    with pytest.raises(grpc.RpcError) as refused:
        inference.predict(samples(1), name="other")
    assert refused.value.code() == NOT_FOUND and "not served here" in refused.value.details()


# ---------------------------------------------------------------- bad input, one server for all


@pytest.fixture(scope="module")
def shared_inference():
    """One server (max_rows 8) with versions 1 and 2 of the model, for the bad-input table."""
    with EmbeddedRedis() as redis_server:
        client = connect(redis_server.url)
        store = CheckpointStore(client)
        publish(store, seed=0)
        publish(store, seed=1)
        inference = Inference(infer_config(redis_server.url, max_rows=8))
        yield inference
        inference.close()
        client.close()


def tensor(dtype: str, shape, data: bytes) -> tandem_common_pb2.Tensor:
    return tandem_common_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def with_value(value: float) -> np.ndarray:
    x = samples(3, dtype=np.float64)
    x[1, 0, 2, 2] = value
    return x


# What is wrong: (request fields, status, what the message names).
BAD_PREDICTS: dict[str, tuple[dict[str, Any], grpc.StatusCode, str]] = {
    "wrong dtype": (dict(inputs=tensor("int32", [1, 1, 8, 8], bytes(256))), INVALID, "inputs.dtype"),
    "unknown dtype": (dict(inputs=tensor("complex64", [1, 64], bytes(512))), INVALID, "inputs.dtype"),
    "no inputs": (dict(), INVALID, "inputs.dtype"),
    "shape that does not fit": (
        dict(inputs=tensor("float32", [2, 7, 7], bytes(392))),
        INVALID,
        "does not fit the model's samples of shape [1, 8, 8]",
    ),
    "byte count that does not match the shape": (
        dict(inputs=tensor("float32", [2, 1, 8, 8], bytes(100))),
        INVALID,
        "inputs.data must hold 512 bytes",
    ),
    "negative dimension": (dict(inputs=tensor("float32", [-1, 64], b"")), INVALID, "inputs.shape"),
    "NaN": (
        dict(inputs=tensor("float64", [3, 1, 8, 8], with_value(np.nan).tobytes())),
        INVALID,
        "NaN, infinity or a value beyond float32's range in the input (first in row 1)",
    ),
    "infinity": (
        dict(inputs=tensor("float64", [3, 1, 8, 8], with_value(-np.inf).tobytes())),
        INVALID,
        "first in row 1",
    ),
    "beyond float32": (
        dict(inputs=tensor("float64", [3, 1, 8, 8], with_value(1e300).tobytes())),
        INVALID,
        "beyond float32's range",
    ),
    "empty batch": (dict(inputs=tensor("float32", [0, 1, 8, 8], b"")), INVALID, "the batch is empty"),
    "too many rows": (
        dict(inputs=tensor("float32", [9, 64], bytes(9 * 256))),
        INVALID,
        "9 rows exceed the limit of 8",
    ),
    "top_k above the classes": (
        dict(inputs=tensor("float32", [1, 64], bytes(256)), top_k=11),
        INVALID,
        "top_k must be from 0 to the model's 10 classes",
    ),
    "negative top_k": (dict(inputs=tensor("float32", [1, 64], bytes(256)), top_k=-1), INVALID, "top_k"),
    "unknown model": (
        dict(model_name="nope", inputs=tensor("float32", [1, 64], bytes(256))),
        NOT_FOUND,
        "'nope' is not served here",
    ),
    "unknown version": (
        dict(inputs=tensor("float32", [1, 64], bytes(256)), version=7),
        NOT_FOUND,
        "no version 7; stored versions: [1, 2]",
    ),
}


@pytest.mark.parametrize("case", BAD_PREDICTS, ids=str)
def test_each_bad_predict_gets_its_status(shared_inference, case):
    fields, status, message = BAD_PREDICTS[case]
    request = pb.PredictRequest(**{"model_name": NAME, **fields})

    with pytest.raises(grpc.RpcError) as refused:
        shared_inference.stub.Predict(request, timeout=DEADLINE)

    assert refused.value.code() == status, refused.value.details()
    assert message in refused.value.details()


def test_bad_requests_are_counted_by_status(shared_inference):
    refused = dict(protocol="grpc", method="Predict", model=NAME, version="", status="INVALID_ARGUMENT")
    answered = dict(protocol="grpc", method="Predict", model=NAME, version="2", status="OK")

    def counts() -> list[float]:
        return [metric_value("tandem_infer_requests_total", **labels) for labels in (refused, answered)]

    before = counts()

    status_of(lambda: shared_inference.predict(samples(0)))
    shared_inference.predict(samples(1))

    assert [a - b for a, b in zip(counts(), before, strict=True)] == [1, 1]


# ---------------------------------------------------------------- hot reload


def test_a_new_version_serves_while_clients_run_without_failures(checkpoints, start_inference):
    _, old = publish(checkpoints, seed=0)
    inference = start_inference()
    x = samples(4)
    answers, failures, stop = [], [], threading.Event()

    def client_loop():
        while not stop.is_set():
            try:
                response = inference.predict(x)
                answers.append((response.version, probabilities(response)))
            except grpc.RpcError as error:
                failures.append(error)

    clients = [threading.Thread(target=client_loop) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        wait_until(lambda: len(answers) >= 20, "answers from version 1")
        _, new = publish(checkpoints, seed=1)
        wait_until(
            lambda: sum(1 for version, _ in answers[-8:] if version == 2) == 8,
            "version 2 answering every request",
        )
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=DEADLINE)

    assert failures == []
    expected = {1: core_probabilities(old, x), 2: core_probabilities(new, x)}
    for version, answer in answers:  # each request was computed whole by one version
        assert_close(answer, expected[version])


def plant_corrupt_version(store: CheckpointStore) -> int:
    """Store the next version with one weight byte flipped and point `latest` at it, unannounced."""
    keys = store.keys_for(NAME)
    counter = store.redis.get(keys.counter)
    assert counter is not None  # a model was published before
    version = int(counter) + 1
    model = digits_model(seed=99)
    blob = bytearray(checkpoint.encode(model, CheckpointMeta(NAME, model.spec, "float32", version=version)))
    blob[-1] ^= 0xFF  # the weights come last: the checksum no longer matches
    store.redis.mset({keys.counter: version, keys.blob(version): bytes(blob), keys.latest: version})
    return version


def test_a_corrupted_checkpoint_is_skipped_and_the_old_version_serves(checkpoints, start_inference):
    _, old = publish(checkpoints, seed=0)
    inference = start_inference()
    failures_before = metric_value("tandem_infer_model_load_failures_total", model=NAME)

    plant_corrupt_version(checkpoints)  # version 2, found by the poll
    wait_until(
        lambda: metric_value("tandem_infer_model_load_failures_total", model=NAME) > failures_before,
        "the corrupt version to fail verification",
    )

    x = samples(2)
    answer = inference.predict(x)
    assert answer.version == 1
    assert_close(probabilities(answer), core_probabilities(old, x))
    assert inference.server.registry.ready
    with pytest.raises(grpc.RpcError) as refused:  # asked for by number: cannot serve it
        inference.predict(x, version=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "checksum mismatch" in refused.value.details()
    # a good version published after it serves: the loader outlived the bad one
    version, _ = publish(checkpoints, seed=1)
    wait_until(lambda: inference.served_version() == version, f"version {version} to serve")


def test_two_replicas_converge_on_the_same_version(checkpoints, start_inference):
    publish(checkpoints, seed=0)
    replicas = [start_inference(), start_inference()]
    for seed in (1, 2, 3):
        latest, model = publish(checkpoints, seed=seed)

    for replica in replicas:
        wait_until(lambda r=replica: r.served_version() == latest, f"a replica to serve version {latest}")
    x = samples(5)
    answers = [probabilities(replica.predict(x)) for replica in replicas]
    np.testing.assert_array_equal(answers[0], answers[1])
    assert_close(answers[0], core_probabilities(model, x))


def test_a_pinned_version_serves_whatever_is_published(checkpoints, start_inference):
    for seed in (0, 1, 2):
        publish(checkpoints, seed=seed)
    pinned = start_inference(pinned={NAME: 2})
    follower = start_inference()  # a witness: once it serves version 4, the announcement went out

    publish(checkpoints, seed=3)
    wait_until(lambda: follower.served_version() == 4, "the follower to serve version 4")

    assert pinned.served_version() == 2
    assert pinned.predict(samples(1), version=4).version == 4  # by number, still answered


# ---------------------------------------------------------------- batching and queue


def test_dynamic_batching_merges_concurrent_requests_with_the_same_answers(checkpoints, start_inference):
    publish(checkpoints, seed=0)
    port = free_loopback_port()
    batched = start_inference(max_queue_delay_ms=200.0, metrics_port=port)
    unbatched = start_inference(batching=False)
    rows = [samples(1 + i % 3, seed=i) for i in range(12)]
    before = scrape_metrics(port)
    start = threading.Barrier(len(rows))

    def ask(x):
        start.wait(timeout=DEADLINE)
        return probabilities(batched.predict(x))

    with ThreadPoolExecutor(len(rows)) as pool:
        answers = list(pool.map(ask, rows))

    after = scrape_metrics(port)
    growth = lambda key: after[key] - before.get(key, 0)  # noqa: E731
    passes = growth(("tandem_infer_batch_requests_count", ()))
    single = growth(("tandem_infer_batch_requests_bucket", (("le", "1.0"),)))
    assert passes - single >= 1, "no forward pass merged more than one request"
    assert passes < len(rows)
    for x, answer in zip(rows, answers, strict=True):
        assert_close(answer, probabilities(unbatched.predict(x)))
    key = (
        "tandem_infer_requests_total",
        (("method", "Predict"), ("model", NAME), ("protocol", "grpc"), ("status", "OK"), ("version", "1")),
    )
    assert growth(key) == len(rows)


def test_a_full_queue_refuses_with_resource_exhausted(checkpoints, start_inference):
    publish(checkpoints, seed=0)
    inference = start_inference(max_queue_rows=4, max_queue_delay_ms=500.0)
    start = threading.Barrier(2)

    def ask(rows):
        start.wait(timeout=DEADLINE)
        return status_of(lambda: inference.predict(samples(rows)))

    with ThreadPoolExecutor(2) as pool:  # both wait in the queue together: 4 + 1 rows > 4
        statuses = sorted(pool.map(ask, (4, 1)), key=str)

    assert statuses == sorted([grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED], key=str)
    with pytest.raises(grpc.RpcError) as refused:
        inference.predict(samples(5))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue is full" in refused.value.details()


def test_reflection_lists_and_describes_both_apis(checkpoints, start_inference):
    # grpcurl and other generic tools find Tandem's API and the Open Inference Protocol alike.
    inference = start_inference(models=())
    database = ProtoReflectionDescriptorDatabase(inference.channel)
    assert set(database.get_services()) == {
        "tandem.v1.Inference",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    pool = DescriptorPool(database)
    kserve = pool.FindServiceByName("inference.GRPCInferenceService")
    assert kserve.methods_by_name["ModelInfer"].input_type.full_name == "inference.ModelInferRequest"
    predict = pool.FindServiceByName("tandem.v1.Inference").methods_by_name["Predict"]
    assert "inputs" in predict.input_type.fields_by_name


# ---------------------------------------------------------------- readiness, Redis, shutdown


def test_live_before_ready_and_ready_once_a_model_serves(checkpoints, start_inference):
    inference = start_inference()  # its model is not published yet: it must start all the same

    def ready() -> bool:
        return inference.kserve.ServerReady(grpc_service_pb2.ServerReadyRequest(), timeout=DEADLINE).ready

    assert inference.kserve.ServerLive(grpc_service_pb2.ServerLiveRequest(), timeout=DEADLINE).live
    assert not ready()
    assert not inference.serving() and not inference.serving("tandem.v1.Inference")
    assert status_of(lambda: inference.predict(samples(1))) == NOT_FOUND

    publish(checkpoints, seed=0)

    wait_until(inference.serving, "health to say SERVING")
    assert ready() and inference.serving("tandem.v1.Inference")
    assert inference.serving("inference.GRPCInferenceService")
    assert inference.served_version() == 1


def test_with_redis_down_the_loaded_model_serves_and_others_are_unavailable(
    private_redis, checkpoints, start_inference
):
    _, model = publish(checkpoints, seed=0)
    inference = start_inference(models=())
    x = samples(2)
    inference.predict(x)  # loads it

    with private_redis.down():
        answer = inference.predict(x)
        with pytest.raises(grpc.RpcError) as refused:
            inference.predict(x, name="other")

    assert_close(probabilities(answer), core_probabilities(model, x))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "Redis is unavailable" in refused.value.details()


def test_graceful_stop_finishes_the_request_in_flight(checkpoints, start_inference):
    _, model = publish(checkpoints, seed=0)
    inference = start_inference(max_queue_delay_ms=300.0)  # a request waits 0.3 s for company
    x = samples(1)
    pending = metric_value("tandem_infer_pending_requests")

    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(inference.predict, x)
        wait_until(lambda: metric_value("tandem_infer_pending_requests") > pending, "the request to arrive")
        inference.server.stop(grace=DEADLINE)
        answer = in_flight.result(timeout=DEADLINE)

    assert_close(probabilities(answer), core_probabilities(model, x))
    assert status_of(lambda: inference.predict(x)) == grpc.StatusCode.UNAVAILABLE


def test_python_m_infer_svc_serves_until_sigterm(private_redis, checkpoints):
    publish(checkpoints, seed=0)
    port = free_loopback_port()
    env = {
        **os.environ,
        "REDIS_URL": private_redis.url,
        "INFER_LISTEN": f"127.0.0.1:{port}",
        "INFER_HTTP_LISTEN": "127.0.0.1:0",
        "INFER_MODELS": NAME,
        "INFER_METRICS_PORT": "0",
        "INFER_GRACE_SECONDS": "5",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "infer_svc"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            wait_until(
                lambda: (
                    status_of(lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=1))
                    == grpc.StatusCode.OK
                    and health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ),
                "the process to serve",
                timeout=30,
            )
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=DEADLINE)
    finally:
        process.kill()
    assert process.returncode == 0, output.decode()
    assert b"event=infer_stopped" in output
