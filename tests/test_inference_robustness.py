"""The inference service against bad versions and hostile values: real gRPC servers on 127.0.0.1,
a real Redis.

- A corrupt `latest` does not stop a replica from serving: the newest
  version that verifies serves, and the corrupt one is fetched once.
- Readiness tells the truth per model: the server is ready only when every
  configured model serves, and each model has a health entry of its own.
- No answer is OK with a non-finite probability, and a request whose rows
  overflow in the forward pass fails alone, not the others in its batch.
- Version strings are the canonical decimal numbers and nothing else.
"""

import functools
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from shared.rpc.stubs import grpc_service_pb2 as kserve_pb
from tests.helpers import metric_value, wait_until
from tests.inference_harness import (
    DEADLINE,
    NAME,
    assert_close,
    core_probabilities,
    corrupt,
    probabilities,
    publish,
    samples,
)

INVALID = grpc.StatusCode.INVALID_ARGUMENT
LOAD_FAILURES = "tandem_infer_model_load_failures_total"


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value


def model_ready(inference, name: str, version: str = "") -> bool:
    request = kserve_pb.ModelReadyRequest(name=name, version=version)
    return inference.kserve.ModelReady(request, timeout=DEADLINE).ready


def server_ready(inference) -> bool:
    return inference.kserve.ServerReady(kserve_pb.ServerReadyRequest(), timeout=DEADLINE).ready


def infer_request(x: np.ndarray, name: str = NAME, version: str = "") -> kserve_pb.ModelInferRequest:
    request = kserve_pb.ModelInferRequest(
        model_name=name, model_version=version, raw_input_contents=[x.tobytes()]
    )
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    return request


def redis_gets(store) -> int:
    """GET commands the store's Redis has run: each poll of the version source reads `latest` with one."""
    return store.redis.info("commandstats").get("cmdstat_get", {}).get("calls", 0)


# ---------------------------------------------------------------- corrupt versions


def test_a_replica_starting_on_a_corrupt_latest_serves_the_newest_good_version(
    checkpoints, start_inference, caplog
):
    name = "fallback"
    caplog.set_level(logging.INFO, logger="tandem.infer.registry")
    publish(checkpoints, seed=0, name=name)
    good, good_model = publish(checkpoints, seed=1, name=name)
    bad, _ = publish(checkpoints, seed=2, name=name)
    corrupt(checkpoints, bad, name)
    failures = metric_value(LOAD_FAILURES, model=name)

    inference = start_inference(models=(name,))

    wait_until(inference.serving, "the replica to be ready")
    x = samples(3)
    answer = inference.predict(x, name=name)
    assert (answer.version, good, bad) == (2, 2, 3)
    assert_close(probabilities(answer), core_probabilities(good_model, x))
    assert inference.serving(name) and server_ready(inference) and model_ready(inference, name)
    assert not model_ready(inference, name, str(bad))
    assert metric_value(LOAD_FAILURES, model=name) - failures == 1
    assert metric_value("tandem_infer_model_failed_version", model=name) == bad
    assert metric_value("tandem_infer_model_version", model=name) == good
    logged = [record.getMessage() for record in caplog.records]
    assert f"event=model_fallback model={name} version=2 skipped=3" in logged
    assert any(f"event=version_failed model={name} version=3" in line for line in logged)

    newer, newer_model = publish(checkpoints, seed=3, name=name)  # a good one after it serves
    answer = wait_until(
        lambda: (a := inference.predict(x, name=name)).version == newer and a, f"version {newer} to serve"
    )
    assert_close(probabilities(answer), core_probabilities(newer_model, x))


def test_a_corrupt_version_is_fetched_once_however_often_it_is_offered(checkpoints, start_inference):
    name = "fetched-once"
    publish(checkpoints, seed=0, name=name)
    bad, _ = publish(checkpoints, seed=1, name=name)
    corrupt(checkpoints, bad, name)
    failures = metric_value(LOAD_FAILURES, model=name)
    inference = start_inference(models=(name,))  # polls `latest` every 0.05 s
    registry = inference.server.registry

    gets = redis_gets(checkpoints)
    wait_until(lambda: redis_gets(checkpoints) >= gets + 20, "at least 10 polls offering the bad version")
    refused = refusal(lambda: inference.predict(samples(1), name=name, version=bad))  # asked by number

    assert metric_value(LOAD_FAILURES, model=name) - failures == 1
    assert "checksum mismatch" in str(registry.failed.error(name, bad))
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and "checksum mismatch" in refused.details()
    assert inference.predict(samples(1), name=name).version == 1


def test_a_version_first_asked_for_by_number_can_become_the_served_one(checkpoints, start_inference):
    # Any model, loaded on first use: version 1 is loaded for a request that names it, then the
    # policy falls back to it, past the corrupt version 2, for a request that names none.
    name = "by-number"
    _, model = publish(checkpoints, seed=0, name=name)
    corrupt(checkpoints, publish(checkpoints, seed=1, name=name)[0], name)
    inference = start_inference(models=())
    x = samples(2)

    assert inference.predict(x, name=name, version=1).version == 1
    answer = inference.predict(x, name=name)

    assert answer.version == 1
    assert_close(probabilities(answer), core_probabilities(model, x))
    assert inference.serving(name)


def test_after_redis_lost_its_data_a_failed_version_number_is_tried_again(checkpoints, start_inference):
    # A reset Redis counts from 1 again: a number that failed before may now hold a good version.
    name = "recounted"
    publish(checkpoints, seed=0, name=name)
    corrupt(checkpoints, publish(checkpoints, seed=1, name=name)[0], name)
    inference = start_inference(models=(name,))
    assert inference.predict(samples(1), name=name).version == 1
    assert inference.server.registry.failed.error(name, 2) is not None

    checkpoints.redis.flushall()
    publish(checkpoints, seed=2, name=name)
    version, model = publish(checkpoints, seed=3, name=name)

    x = samples(2)
    answer = wait_until(
        lambda: (a := inference.predict(x, name=name)).version == version and a, "the new version 2 to serve"
    )
    assert_close(probabilities(answer), core_probabilities(model, x))


# ---------------------------------------------------------------- readiness per model


def test_the_server_is_ready_only_when_every_configured_model_serves(checkpoints, start_inference):
    publish(checkpoints, seed=0, name="good")
    corrupt(checkpoints, publish(checkpoints, seed=1, name="broken")[0], "broken")

    inference = start_inference(models=("good", "broken"))

    wait_until(lambda: inference.serving("good"), "the good model to serve")
    for service in ("", "tandem.v1.Inference", "inference.GRPCInferenceService", "broken"):
        assert not inference.serving(service), service
    assert not server_ready(inference)
    assert model_ready(inference, "good") and model_ready(inference, "good", "1")
    assert not model_ready(inference, "broken") and not model_ready(inference, "broken", "1")
    assert inference.predict(samples(1), name="good").version == 1

    publish(checkpoints, seed=2, name="broken")  # version 2 verifies

    wait_until(inference.serving, "the server to be ready")
    assert inference.serving("broken") and server_ready(inference)
    assert model_ready(inference, "broken") and model_ready(inference, "broken", "2")
    assert not model_ready(inference, "broken", "1")


# ---------------------------------------------------------------- overflow in the forward pass


def overflowing(rows: int = 3) -> np.ndarray:
    """Finite float32 samples whose rows 1 and after overflow float32 in the forward pass."""
    x = samples(rows)
    x[1:] = np.where(np.arange(rows - 1)[:, None, None, None] % 2, -3e38, 3e38)
    return x


@pytest.mark.parametrize("api", ["Predict", "ModelInfer"])
def test_rows_that_overflow_are_refused_and_their_batch_neighbour_answers(checkpoints, start_inference, api):
    _, model = publish(checkpoints, seed=0)
    # A forward pass waits for 4 rows: the 3 overflowing ones and the good one share it.
    inference = start_inference(max_batch_size=4, max_queue_delay_ms=DEADLINE * 1000 / 2)
    batches = metric_value("tandem_infer_batch_requests_count")
    shared = batches - metric_value("tandem_infer_batch_requests_bucket", le="1.0")
    good = samples(1, seed=5)
    bad_call = {
        "Predict": lambda: inference.predict(overflowing()),
        "ModelInfer": lambda: inference.kserve.ModelInfer(infer_request(overflowing()), timeout=DEADLINE),
    }[api]

    with ThreadPoolExecutor(2) as pool:
        refused = pool.submit(refusal, bad_call)
        answer = pool.submit(inference.predict, good)
        refused, answer = refused.result(timeout=DEADLINE), answer.result(timeout=DEADLINE)

    assert refused.code() == INVALID, refused.details()
    field = "inputs" if api == "Predict" else "inputs[0]"
    assert f"{field}: row 1 overflows float32's range in the model's forward pass" in refused.details()
    assert_close(probabilities(answer), core_probabilities(model, good))
    after = metric_value("tandem_infer_batch_requests_count")
    assert after - metric_value("tandem_infer_batch_requests_bucket", le="1.0") - shared == 1, (
        "the two requests did not share a forward pass"
    )


# ---------------------------------------------------------------- version strings

NOT_VERSIONS = [
    "+1",
    "١",
    " 1",
    "1 ",
    "1\n",
    "01",
    "0",
    "-1",
    "1.0",
    "99999999999999999999",
    "9223372036854775808",
]


def test_only_canonical_version_numbers_are_accepted(checkpoints, start_inference):
    publish(checkpoints, seed=0)
    inference = start_inference()
    calls = {  # the field each method reads the version from: (call with a version string)
        "model_version": lambda v: inference.kserve.ModelInfer(
            infer_request(samples(1), version=v), timeout=DEADLINE
        ),
        "version": lambda v: inference.kserve.ModelMetadata(
            kserve_pb.ModelMetadataRequest(name=NAME, version=v), timeout=DEADLINE
        ),
    }

    for text in NOT_VERSIONS:
        for field, call in [*calls.items(), ("version", lambda v: model_ready(inference, NAME, v))]:
            refused = refusal(functools.partial(call, text))
            assert refused.code() == INVALID, (text, field, refused.code())
            assert refused.details().startswith(
                f"{field} must be empty (the served version) or a version number"
            ), (text, refused.details())
    assert (
        inference.kserve.ModelInfer(infer_request(samples(1), version="1"), timeout=DEADLINE).model_version
        == "1"
    )
    assert model_ready(inference, NAME, "1") and not model_ready(inference, NAME, "2")
