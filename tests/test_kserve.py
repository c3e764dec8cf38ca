"""The Open Inference Protocol (KServe v2) endpoint, called by its reference client, tritonclient.

The server runs in this process on 127.0.0.1 against a real Redis; tritonclient
talks to it over gRPC with its own build of grpc_service.proto, so these tests
also check that the wire format (package, names, field numbers) is the
protocol's. Typed-contents requests, which tritonclient's gRPC client does not
send, go through tritonclient's generated stub.
"""

from importlib import metadata

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.inference_harness import (
    DEADLINE,
    NAME,
    assert_close,
    core_probabilities,
    probabilities,
    samples,
)


@pytest.fixture
def client(served):
    inference, _ = served
    with triton.InferenceServerClient(url=inference.address) as client:
        yield client


def triton_infer(client, x: np.ndarray, datatype: str = "FP32", outputs=None, **options):
    infer_input = triton.InferInput("input", list(x.shape), datatype).set_data_from_numpy(x)
    requested = None if outputs is None else [triton.InferRequestedOutput(name) for name in outputs]
    return client.infer(NAME, [infer_input], outputs=requested, client_timeout=DEADLINE, **options)


def typed_request(x: np.ndarray, datatype: str = "FP32", **fields) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=NAME, **fields)
    tensor = request.inputs.add(name="input", datatype=datatype, shape=x.shape)
    contents = tensor.contents.fp32_contents if datatype == "FP32" else tensor.contents.fp64_contents
    contents.extend(x.ravel().tolist())
    return request


def raw_request(x: np.ndarray, datatype: str = "FP32", **fields) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=NAME, raw_input_contents=[x.tobytes()], **fields)
    request.inputs.add(name="input", datatype=datatype, shape=x.shape)
    return request


def refusal(client, x, **options) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as refused:
        triton_infer(client, x, **options)
    return refused.value


def raw_refusal(stub, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        stub.ModelInfer(request, timeout=DEADLINE)
    return refused.value


# ---------------------------------------------------------------- inference


def test_tritonclient_gets_the_probabilities_of_our_own_predict(served, client):
    inference, models = served
    x = samples(6)

    result = triton_infer(client, x, request_id="req-1")

    ours = inference.predict(x)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probabilities(ours))
    np.testing.assert_array_equal(result.as_numpy("classes"), list(ours.classes))
    assert result.as_numpy("classes").dtype == np.int64
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (NAME, "2", "req-1")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("probabilities", "FP32", [6, 10]),
        ("classes", "INT64", [6]),
    ]
    assert_close(result.as_numpy("probabilities"), core_probabilities(models[2], x))


def test_an_older_version_and_chosen_outputs(served, client):
    _, models = served
    x = samples(3)

    result = triton_infer(client, x, model_version="1", outputs=["classes"])

    assert result.get_response().model_version == "1"
    assert result.as_numpy("probabilities") is None
    expected = core_probabilities(models[1], x).argmax(axis=1)
    np.testing.assert_array_equal(result.as_numpy("classes"), expected)


def test_fp64_inputs(served, client):
    _, models = served
    x = samples(2, dtype=np.float64)

    result = triton_infer(client, x, datatype="FP64")

    assert_close(result.as_numpy("probabilities"), core_probabilities(models[2], x))


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_typed_contents_answer_like_raw_bytes(served, datatype):
    inference, _ = served
    x = samples(4, dtype=np.float32 if datatype == "FP32" else np.float64)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(inference.channel)

    typed = stub.ModelInfer(typed_request(x, datatype), timeout=DEADLINE)
    raw = stub.ModelInfer(raw_request(x, datatype), timeout=DEADLINE)

    assert typed.raw_output_contents == raw.raw_output_contents
    assert_close(
        np.frombuffer(typed.raw_output_contents[0], "<f4").reshape(4, 10), probabilities(inference.predict(x))
    )


# ---------------------------------------------------------------- health and metadata


def test_liveness_readiness_and_model_readiness(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME)
    assert client.is_model_ready(NAME, "1") and client.is_model_ready(NAME, "2")
    assert not client.is_model_ready(NAME, "3")
    assert not client.is_model_ready("nope")


def test_server_and_model_metadata(client):
    server = client.get_server_metadata()
    assert (server.name, server.version) == ("tandem", metadata.version("tandem"))
    assert list(server.extensions) == ["binary_tensor_data"]

    model = client.get_model_metadata(NAME)

    assert (model.name, list(model.versions), model.platform) == (NAME, ["1", "2"], "tandem_numpy")
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [("input", "FP32", [-1, 1, 8, 8])]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
        ("probabilities", "FP32", [-1, 10]),
        ("classes", "INT64", [-1]),
    ]
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("nope")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"


# ---------------------------------------------------------------- refusals


def test_refusals_through_tritonclient(client):
    wrong_type = refusal(client, np.zeros((1, 1, 8, 8), np.int32), datatype="INT32")
    assert wrong_type.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'INT32' is not accepted; use one of FP32, FP64" in wrong_type.message()

    assert refusal(client, np.zeros((2, 7, 7), np.float32)).status() == "StatusCode.INVALID_ARGUMENT"
    assert refusal(client, samples(0)).status() == "StatusCode.INVALID_ARGUMENT"
    assert refusal(client, samples(1), model_version="latest").status() == "StatusCode.INVALID_ARGUMENT"
    assert refusal(client, samples(1), model_version="9").status() == "StatusCode.NOT_FOUND"
    assert refusal(client, samples(1), outputs=["logits"]).status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException) as unknown:
        client.infer(
            "nope",
            [triton.InferInput("input", [1, 64], "FP32").set_data_from_numpy(samples(1).reshape(1, 64))],
            client_timeout=DEADLINE,
        )
    assert unknown.value.status() == "StatusCode.NOT_FOUND"


def test_refusals_of_malformed_requests(served):
    inference, _ = served
    stub = service_pb2_grpc.GRPCInferenceServiceStub(inference.channel)
    x = samples(2)
    short_bytes = raw_request(x)
    short_bytes.raw_input_contents[0] = x.tobytes()[:-4]
    both = typed_request(x)
    both.raw_input_contents.append(x.tobytes())
    neither = raw_request(x)
    del neither.raw_input_contents[:]
    few_values = typed_request(x)
    few_values.inputs[0].shape[0] = 3
    renamed = raw_request(x)
    renamed.inputs[0].name = "pixels"
    two_inputs = raw_request(x)
    two_inputs.inputs.add(name="mask", datatype="FP32", shape=[2])
    many_dimensions = raw_request(x)
    del many_dimensions.inputs[0].shape[:]
    many_dimensions.inputs[0].shape.extend([1] * 40)
    with_nan = x.copy()
    with_nan[1, 0, 4, 4] = np.nan
    cases = {  # what is wrong: (request, what the message says)
        "byte length": (short_bytes, "raw_input_contents[0].data must hold 512 bytes"),
        "raw and typed": (both, "exactly one of them"),
        "no data": (neither, "exactly one of them"),
        "value count": (few_values, "holds 128 values; shape [3, 1, 8, 8] needs 192"),
        "input name": (renamed, "inputs[0].name must be 'input'"),
        "NaN": (raw_request(with_nan), "inputs[0]: NaN"),
        "two inputs": (two_inputs, "the model takes one input, 'input'; got 2"),
        "many dimensions": (many_dimensions, "inputs[0].shape has 40 dimensions; at most 32"),
    }
    for case, (request, message) in cases.items():
        refused = raw_refusal(stub, request)
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, case
        assert message in refused.details(), (case, refused.details())
