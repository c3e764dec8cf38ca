"""The Open Inference Protocol (KServe v2) over HTTP/REST, called by its reference client,
tritonclient.http, and by hand (requests, http.client, raw sockets) for what it does not send.

Each server runs in this process on 127.0.0.1 against a real Redis, with its
HTTP port on a free port; TLS certificates are made in the test. What the
HTTP port answers is compared with what the gRPC port answers and with the
NumPy core's own forward pass.
"""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import socket
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from infer_svc.config import InferConfig
from infer_svc.server import InferenceServer
from shared.security import auth
from shared.security.access import HTTP_ROUTE_ROLES, AccessSettings
from shared.security.certs import CertificateAuthority
from shared.security.tls import ServerTLS
from tests.helpers import metric_value, replace_file, wait_until
from tests.inference_harness import (
    DEADLINE,
    NAME,
    assert_close,
    core_probabilities,
    infer_config,
    publish,
    samples,
)

INFER = f"/v2/models/{NAME}/infer"


@pytest.fixture
def client(served):
    inference, _ = served
    client = triton_http.InferenceServerClient(url=inference.http_address, network_timeout=DEADLINE)
    yield client
    client.close()


def http_infer(client, x: np.ndarray, datatype="FP32", binary_inputs=True, binary_outputs=True, **options):
    infer_input = triton_http.InferInput("input", list(x.shape), datatype)
    infer_input.set_data_from_numpy(x, binary_data=binary_inputs)
    outputs = [triton_http.InferRequestedOutput(name, binary_data=binary_outputs) for name in OUTPUTS]
    return client.infer(NAME, [infer_input], outputs=outputs, **options)


OUTPUTS = ("probabilities", "classes")


def grpc_probabilities(inference, x: np.ndarray, datatype="FP32", **options) -> np.ndarray:
    with triton_grpc.InferenceServerClient(url=inference.address) as client:
        infer_input = triton_grpc.InferInput("input", list(x.shape), datatype).set_data_from_numpy(x)
        return client.infer(NAME, [infer_input], client_timeout=DEADLINE, **options).as_numpy("probabilities")


def post(
    url: str, body: bytes | dict | Iterator[bytes], headers: dict | None = None, **options
) -> requests.Response:
    """POST `body` (a dict as JSON; an iterator of chunks, chunked) to `url`."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    return requests.post(url, data=data, headers=headers, timeout=DEADLINE, **options)


def get(url: str, **options) -> requests.Response:
    return requests.get(url, timeout=DEADLINE, **options)


def json_request(x: np.ndarray, nested: bool = False, **fields) -> dict:
    data = x.tolist() if nested else x.ravel().tolist()
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data}], **fields}


def binary_request(x: np.ndarray, shape: list | None = None, size: object = None) -> tuple[bytes, dict]:
    """A body of one input's JSON (of `shape` and `size`, by default x's) with x's bytes after it."""
    raw = x.tobytes()
    parameters = {"binary_data_size": len(raw) if size is None else size}
    tensor = {"name": "input", "shape": shape or list(x.shape), "datatype": "FP32", "parameters": parameters}
    text = json.dumps({"inputs": [tensor]}).encode()
    return text + raw, {"Inference-Header-Content-Length": str(len(text))}


# ---------------------------------------------------------------- tritonclient.http


def test_health_and_metadata_through_tritonclient(served, client):
    inference, _ = served
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME)
    assert client.is_model_ready(NAME, "1") and client.is_model_ready(NAME, "2")
    assert not client.is_model_ready(NAME, "3")
    assert not client.is_model_ready("nope")

    with triton_grpc.InferenceServerClient(url=inference.address) as over_grpc:
        grpc_server = over_grpc.get_server_metadata(as_json=True)
        grpc_model = over_grpc.get_model_metadata(NAME, as_json=True)
    server = client.get_server_metadata()
    assert server == {key: grpc_server[key] for key in ("name", "version", "extensions")}
    assert server["name"] == "tandem" and server["extensions"] == ["binary_tensor_data"]
    model = client.get_model_metadata(NAME)
    assert model == {
        "name": NAME,
        "versions": ["1", "2"],
        "platform": "tandem_numpy",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "classes", "datatype": "INT64", "shape": [-1]},
        ],
    }
    for tensors in ("inputs", "outputs"):  # gRPC's JSON writes int64 shapes as strings
        for ours, theirs in zip(model[tensors], grpc_model[tensors], strict=True):
            assert (ours["name"], ours["datatype"]) == (theirs["name"], theirs["datatype"])
            assert ours["shape"] == [int(d) for d in theirs["shape"]]
    assert client.get_model_metadata(NAME, "1")["versions"] == ["1", "2"]
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("nope")
    assert unknown.value.status() == "404" and "not served here" in unknown.value.message()


@pytest.mark.parametrize("binary_inputs", [True, False])
@pytest.mark.parametrize("binary_outputs", [True, False])
@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_tritonclient_infers_what_grpc_and_the_core_compute(
    served, client, binary_inputs, binary_outputs, datatype
):
    inference, models = served
    x = samples(5, dtype=np.float32 if datatype == "FP32" else np.float64)

    result = http_infer(client, x, datatype, binary_inputs, binary_outputs, request_id="req-7")

    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and result.as_numpy("classes").dtype == np.int64
    np.testing.assert_array_equal(probabilities, grpc_probabilities(inference, x, datatype))
    np.testing.assert_array_equal(result.as_numpy("classes"), probabilities.argmax(axis=1))
    assert_close(probabilities, core_probabilities(models[2], x))
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (NAME, "2", "req-7")
    assert [(o["name"], o["datatype"], o["shape"]) for o in response["outputs"]] == [
        ("probabilities", "FP32", [5, 10]),
        ("classes", "INT64", [5]),
    ]
    assert all(("parameters" in o) == binary_outputs for o in response["outputs"])


def test_a_named_version_and_the_default_outputs(served, client):
    inference, models = served
    x = samples(3)
    infer_input = triton_http.InferInput("input", list(x.shape), "FP32").set_data_from_numpy(x)

    result = client.infer(NAME, [infer_input], model_version="1")  # no outputs: all, as binary

    assert result.get_response()["model_version"] == "1"
    assert all(o["parameters"]["binary_data_size"] for o in result.get_response()["outputs"])
    np.testing.assert_array_equal(
        result.as_numpy("probabilities"), grpc_probabilities(inference, x, model_version="1")
    )
    assert_close(result.as_numpy("probabilities"), core_probabilities(models[1], x))


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(served, client, algorithm):
    _, models = served
    x = samples(4)

    result = http_infer(client, x, request_compression_algorithm=algorithm)

    assert_close(result.as_numpy("probabilities"), core_probabilities(models[2], x))


# ---------------------------------------------------------------- JSON by hand


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_json_tensors_flat_and_nested(served, nested):
    inference, models = served
    x = samples(2)

    answer = post(inference.http_url + INFER, json_request(x, nested, id="mine"))

    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("application/json")
    body = answer.json()
    assert (body["model_name"], body["model_version"], body["id"]) == (NAME, "2", "mine")
    probabilities, classes = body["outputs"]
    assert (probabilities["name"], probabilities["datatype"], probabilities["shape"]) == (
        "probabilities",
        "FP32",
        [2, 10],
    )
    got = np.array(probabilities["data"], dtype=np.float32).reshape(2, 10)
    np.testing.assert_array_equal(got, grpc_probabilities(inference, x))
    assert_close(got, core_probabilities(models[2], x))
    assert classes == {
        "name": "classes",
        "datatype": "INT64",
        "shape": [2],
        "data": got.argmax(axis=1).tolist(),
    }


def test_binary_outputs_by_request_parameter_and_a_versioned_route(served):
    inference, models = served
    x = samples(2)
    request = json_request(x, parameters={"binary_data_output": True}, outputs=[{"name": "classes"}])

    answer = post(f"{inference.http_url}/v2/models/{NAME}/versions/1/infer", request)

    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/octet-stream"
    length = int(answer.headers["Inference-Header-Content-Length"])
    header, raw = json.loads(answer.content[:length]), answer.content[length:]
    assert header["model_version"] == "1"
    assert header["outputs"] == [
        {"name": "classes", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": 16}}
    ]
    expected = core_probabilities(models[1], x).argmax(axis=1)
    np.testing.assert_array_equal(np.frombuffer(raw, "<i8"), expected)


# ---------------------------------------------------------------- refusals


def refusal_cases(x: np.ndarray):
    """(what is wrong, body, headers, status, words of the message)."""
    good = json_request(x)

    def with_input(**fields):
        return {"inputs": [{**good["inputs"][0], **fields}]}

    raw_body, _ = binary_request(x)
    good_text = json.dumps(good).encode()
    mismatched_body, mismatched_headers = binary_request(x, shape=[3, 1, 8, 8])
    beyond_body, beyond_headers = binary_request(x, size=4096)
    both = {"inputs": [{**good["inputs"][0], "parameters": {"binary_data_size": 512}}]}
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        ("not JSON", b'{"inputs": [', {}, 400, "not JSON: Expecting value at line 1 column 13"),
        ("not UTF-8", b'{"id": "\xff"}', {}, 400, "not UTF-8"),
        ("nested too deep", deep, {}, 400, "nests lists or objects too deep"),
        ("a list", b"[]", {}, 400, "the request body must be a JSON object; got a list"),
        ("no inputs", {}, {}, 400, "inputs is missing"),
        ("inputs not a list", {"inputs": {}}, {}, 400, "inputs must be a list; got an object"),
        (
            "two inputs",
            {"inputs": [good["inputs"][0]] * 2},
            {},
            400,
            "the model takes one input, 'input'; got 2",
        ),
        ("input not an object", {"inputs": [7]}, {}, 400, "inputs[0] must be a JSON object; got an integer"),
        ("input name", with_input(name="pixels"), {}, 400, "inputs[0].name must be 'input'"),
        ("input name type", with_input(name=1), {}, 400, "inputs[0].name must be a string; got an integer"),
        (
            "datatype",
            with_input(datatype="INT32"),
            {},
            400,
            "inputs[0].datatype 'INT32' is not accepted; use one of FP32, FP64",
        ),
        (
            "datatype type",
            with_input(datatype=["FP32"]),
            {},
            400,
            "inputs[0].datatype must be a string; got a list",
        ),
        ("shape type", with_input(shape="2,1,8,8"), {}, 400, "inputs[0].shape must be a list; got a string"),
        (
            "shape negative",
            with_input(shape=[-2, 1, 8, 8]),
            {},
            400,
            "inputs[0].shape must have no negative dimension",
        ),
        (
            "shape boolean",
            with_input(shape=[True, 1, 8, 8]),
            {},
            400,
            "inputs[0].shape must be a list of integers",
        ),
        (
            "shape float",
            with_input(shape=[2.0, 1, 8, 8]),
            {},
            400,
            "inputs[0].shape must be a list of integers",
        ),
        (
            "shape of many dimensions",
            with_input(shape=[1] * 100_000),
            {},
            400,
            "inputs[0].shape has 100000 dimensions; at most 32",
        ),
        (
            "shape huge",
            with_input(shape=[2**64, 1, 8, 8]),
            {},
            400,
            "inputs[0].shape must be a list of integers",
        ),
        (
            "value count",
            with_input(shape=[3, 1, 8, 8]),
            {},
            400,
            "inputs[0].data holds 128 values; shape [3, 1, 8, 8] needs 192",
        ),
        (
            "strings",
            with_input(data=["0.5"] * 128),
            {},
            400,
            "inputs[0].data must hold numbers; it holds a string",
        ),
        (
            "booleans",
            with_input(data=[True] * 128),
            {},
            400,
            "inputs[0].data must hold numbers; it holds true",
        ),
        ("nulls", with_input(data=[None] * 128), {}, 400, "inputs[0].data must hold numbers; it holds null"),
        ("data not a list", with_input(data=0.5), {}, 400, "inputs[0].data must be a list of numbers"),
        (
            "ragged lengths",
            with_input(data=[[0.0] * 64, [0.0] * 63]),
            {},
            400,
            "inputs[0].data is ragged: lists of 63 to 64",
        ),
        (
            "ragged depth",
            with_input(data=[[0.0] * 64, 0.0]),
            {},
            400,
            "inputs[0].data is ragged: lists and numbers",
        ),
        (
            "no data",
            {"inputs": [{k: v for k, v in good["inputs"][0].items() if k != "data"}]},
            {},
            400,
            "exactly one of them",
        ),
        ("data and binary", both, {}, 400, "exactly one of them"),
        (
            "NaN literal",
            json.dumps(good).replace("[", "[NaN, ", 2).encode(),
            {},
            400,
            "NaN, which is not a JSON number",
        ),
        (
            "beyond float64",
            with_input(data=[10**400] + [0] * 127),
            {},
            400,
            "inputs[0].data holds an integer beyond float64",
        ),
        (
            "beyond float32",
            with_input(data=[1e39] + [0] * 127),
            {},
            400,
            "inputs[0]: NaN, infinity or a value beyond float32",
        ),
        ("empty batch", with_input(shape=[0, 1, 8, 8], data=[]), {}, 400, "inputs[0]: the batch is empty"),
        ("wrong sample shape", with_input(shape=[4, 32]), {}, 400, "inputs[0]: "),
        (
            "binary size vs shape",
            mismatched_body,
            mismatched_headers,
            400,
            "inputs[0].parameters.binary_data_size=512: inputs[0].data must hold 768 bytes",
        ),
        (
            "binary size beyond",
            beyond_body,
            beyond_headers,
            400,
            "inputs[0].parameters.binary_data_size is 4096 bytes; 512 follow the JSON",
        ),
        (
            "binary size type",
            *binary_request(x, size="512"),
            400,
            "inputs[0].parameters.binary_data_size must be an integer; got a string",
        ),
        (
            "bytes nobody owns",
            good_text + x.tobytes(),
            {"Inference-Header-Content-Length": str(len(good_text))},
            400,
            "the body holds 512 bytes after the JSON, and no input says they are its own",
        ),
        (
            "header length",
            raw_body,
            {"Inference-Header-Content-Length": "-5"},
            400,
            "the Inference-Header-Content-Length header must be the length",
        ),
        (
            "header length beyond",
            raw_body,
            {"Inference-Header-Content-Length": "99999999999999999999999"},
            400,
            "Inference-Header-Content-Length header",
        ),
        (
            "unknown output",
            {**good, "outputs": [{"name": "logits"}]},
            {},
            400,
            "outputs: no output named 'logits'",
        ),
        (
            "output binary_data",
            {**good, "outputs": [{"name": "classes", "parameters": {"binary_data": 1}}]},
            {},
            400,
            "outputs[0].parameters.binary_data must be true or false; got an integer",
        ),
        (
            "binary_data_output",
            {**good, "parameters": {"binary_data_output": "yes"}},
            {},
            400,
            "parameters.binary_data_output must be true or false",
        ),
        ("id type", {**good, "id": 5}, {}, 400, "id must be a string; got an integer"),
        (
            "encoding",
            json.dumps(good).encode(),
            {"Content-Encoding": "br"},
            415,
            "Content-Encoding 'br' is not accepted; send identity, gzip, deflate",
        ),
        (
            "bad gzip",
            gzip.compress(b"{}")[:10] + b"\xff" * 16,
            {"Content-Encoding": "gzip"},
            400,
            "the request body is not valid gzip data",
        ),
    ]


def test_every_refusal_has_its_status_and_names_the_field(served):
    inference, _ = served
    for case, body, headers, status, words in refusal_cases(samples(2)):
        answer = post(inference.http_url + INFER, body, headers)
        assert answer.status_code == status, (case, answer.status_code, answer.text)
        assert words in answer.json()["error"], (case, answer.json())
    assert inference.serving(), "the server stays up"
    assert post(inference.http_url + INFER, json_request(samples(1))).status_code == 200


def test_versions_models_paths_and_methods(served):
    inference, _ = served
    url = inference.http_url
    x = json_request(samples(1))
    cases = [
        (post(f"{url}/v2/models/{NAME}/versions/07/infer", x), 400, "model_version must be empty"),
        (post(f"{url}/v2/models/{NAME}/versions/%2B1/infer", x), 400, "got '+1'"),
        (post(f"{url}/v2/models/{NAME}/versions/9/infer", x), 404, "version 9"),
        (post(f"{url}/v2/models/nope/infer", x), 404, "'nope' is not served here"),
        (get(f"{url}/v2/models/{NAME}/versions/x1"), 400, "version must be empty"),
        (get(f"{url}/v2/models/{NAME}/versions/9/ready"), 503, ""),
        (get(f"{url}/v2/models/{NAME}/versions/00/ready"), 400, "version must be empty"),
        (get(f"{url}/v2/models/nope/ready"), 503, ""),
        (get(f"{url}/v3/models"), 404, "no route /v3/models: the routes are /v2"),
        (get(f"{url}{INFER}"), 405, "GET is not served at /v2/models/digits/infer; use POST"),
        (requests.delete(f"{url}/v2/health/ready", timeout=DEADLINE), 405, "use GET"),
    ]
    for answer, status, words in cases:
        assert answer.status_code == status, (answer.url, answer.text)
        assert words in answer.text, (answer.url, answer.text)
    assert cases[9][0].headers["Allow"] == "POST"


def test_a_body_over_the_limit_is_refused_from_its_content_length_before_it_is_read(served):
    inference, _ = served
    limit = inference.server.config.max_message_bytes
    connection = http.client.HTTPConnection(inference.http_address, timeout=DEADLINE)
    connection.putrequest("POST", INFER)
    connection.putheader("Content-Length", str(1000 * limit))  # 16 GB announced,
    connection.endheaders(b"{}")  # two bytes sent: the answer cannot wait for the rest

    answer = connection.getresponse()

    assert answer.status == 413
    message = json.loads(answer.read())["error"]
    assert f"the request body is {1000 * limit:,} bytes; the limit is {limit:,} bytes" in message
    assert "INFER_MAX_MESSAGE_BYTES" in message
    assert answer.getheader("Connection") == "close"
    connection.close()


def test_chunked_and_compressed_bodies_are_bounded_as_they_are_read(checkpoints, start_inference):
    publish(checkpoints, seed=0)
    inference = start_inference(max_message_bytes=64 * 2**10)
    chunks = (b" " * 2**14 for _ in range(8))  # 128 KiB of whitespace, sent without a length

    chunked = post(inference.http_url + INFER, chunks)  # requests sends a generator chunked
    bomb = post(inference.http_url + INFER, gzip.compress(b" " * 2**20), {"Content-Encoding": "gzip"})
    deflated = post(inference.http_url + INFER, zlib.compress(b" " * 2**20), {"Content-Encoding": "deflate"})

    for answer in (chunked, bomb, deflated):
        assert answer.status_code == 413, answer.text
        assert "the request body (read so far) is" in answer.json()["error"]
    small = post(
        inference.http_url + INFER,
        gzip.compress(json.dumps(json_request(samples(1))).encode()),
        {"Content-Encoding": "gzip"},
    )
    assert small.status_code == 200


def held_request(address: str, body: bytes) -> socket.socket:
    """A POST of `body` to INFER with all but its last byte sent: the server holds it in hand."""
    held = socket.create_connection(tuple(address.rsplit(":", 1)), timeout=DEADLINE)  # type: ignore[arg-type]
    head = f"POST {INFER} HTTP/1.1\r\nHost: {address}\r\nContent-Length: {len(body)}\r\n\r\n"
    held.sendall(head.encode() + body[:-1])
    return held


def finish(held: socket.socket, body: bytes) -> int:
    """Send the last byte of a held request; the status of its answer."""
    held.sendall(body[-1:])
    with held.makefile("rb") as answer:
        return int(answer.readline().split()[1])


def test_requests_beyond_four_per_thread_are_refused_with_429(checkpoints, start_inference):
    publish(checkpoints, seed=0)
    inference = start_inference(grpc_workers=1)  # at most 4 requests in hand
    body = json.dumps(json_request(samples(1))).encode()
    pending = metric_value("tandem_infer_pending_requests")
    held = [held_request(inference.http_address, body) for _ in range(4)]
    wait_until(lambda: metric_value("tandem_infer_pending_requests") == pending + 4, "4 requests in hand")

    refused = post(inference.http_url + INFER, body)

    assert refused.status_code == 429
    assert "4 requests are in hand already" in refused.json()["error"]
    assert get(f"{inference.http_url}/v2/health/ready").status_code == 200  # probes still answered
    assert [finish(request, body) for request in held] == [200] * 4
    assert post(inference.http_url + INFER, body).status_code == 200


def test_http_requests_are_counted_beside_grpc_ones(served):
    inference, _ = served
    labels = {"protocol": "http", "method": "ModelInfer", "model": NAME}
    answered, refused = (
        {**labels, "version": "2", "status": "OK"},
        {**labels, "version": "", "status": "INVALID_ARGUMENT"},
    )
    unknown = {**labels, "model": "", "version": "", "status": "NOT_FOUND"}

    def counts() -> list[float]:
        return [metric_value("tandem_infer_requests_total", **each) for each in (answered, refused, unknown)]

    before = counts()
    seconds = metric_value("tandem_infer_request_seconds_count", protocol="http", method="ModelInfer")
    post(inference.http_url + INFER, json_request(samples(1)))
    post(inference.http_url + INFER, json_request(samples(0)))
    post(f"{inference.http_url}/v2/models/made-up/infer", json_request(samples(1)))

    assert [a - b for a, b in zip(counts(), before, strict=True)] == [1, 1, 1]
    assert (
        metric_value("tandem_infer_request_seconds_count", protocol="http", method="ModelInfer")
        == seconds + 3
    )


# ---------------------------------------------------------------- readiness and stop


def test_ready_is_503_until_a_model_serves(checkpoints, start_inference):
    inference = start_inference(poll_seconds=0.05)
    url = inference.http_url

    assert get(f"{url}/v2/health/live").json() == {"live": True}
    not_ready = get(f"{url}/v2/health/ready")
    assert (not_ready.status_code, not_ready.json()) == (503, {"ready": False})
    assert get(f"{url}/v2/models/{NAME}/ready").status_code == 503
    publish(checkpoints, seed=0)

    wait_until(lambda: get(f"{url}/v2/health/ready").status_code == 200, "the server to be ready")
    assert get(f"{url}/v2/models/{NAME}/ready").json() == {"name": NAME, "ready": True}
    assert get(f"{url}/v2/models/{NAME}/versions/1/ready").status_code == 200


def test_a_graceful_stop_turns_ready_503_and_lets_calls_in_flight_finish(checkpoints, start_inference):
    publish(checkpoints, seed=0)
    inference = start_inference()
    body = json.dumps(json_request(samples(1))).encode()
    pending = metric_value("tandem_infer_pending_requests")
    in_flight = held_request(inference.http_address, body)
    wait_until(lambda: metric_value("tandem_infer_pending_requests") == pending + 1, "the request in hand")
    stopping = threading.Thread(target=inference.server.stop, args=(10.0,))
    stopping.start()

    wait_until(lambda: get(f"{inference.http_url}/v2/health/ready").status_code == 503, "ready to turn 503")
    assert get(f"{inference.http_url}/v2/health/live").status_code == 200
    refused = post(inference.http_url + INFER, body)
    assert refused.status_code == 503 and "the server is stopping" in refused.json()["error"]
    assert finish(in_flight, body) == 200  # the call in flight is answered

    stopping.join(timeout=DEADLINE)
    assert not stopping.is_alive()
    with pytest.raises(requests.ConnectionError):
        get(f"{inference.http_url}/v2/health/live")


# ---------------------------------------------------------------- auth


def test_tokens_guard_everything_but_health(checkpoints, start_inference, tmp_path):
    publish(checkpoints, seed=0)
    tokens_file = tmp_path / "tokens.json"
    predict = auth.issue(tokens_file, "app", [auth.PREDICT])
    train = auth.issue(tokens_file, "trainer-bot", [auth.TRAIN])
    inference = start_inference(auth=AccessSettings(tokens_file=str(tokens_file)))
    url = inference.http_url

    def infer(**headers) -> requests.Response:
        return post(url + INFER, json_request(samples(1)), headers)

    missing, unknown = infer(), infer(Authorization="Bearer not-a-token")
    for answer, words in ((missing, "needs credentials"), (unknown, "not known here")):
        assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer"
        assert words in answer.json()["error"]
    assert "malformed" not in infer(Authorization="Basic abc").text
    assert infer(Authorization="Basic abc").status_code == 401
    denied = infer(Authorization=f"Bearer {train}")
    assert denied.status_code == 403 and "it needs the role predict" in denied.json()["error"]
    assert infer(Authorization=f"Bearer {predict}").status_code == 200
    assert get(f"{url}/v2", headers={"Authorization": f"Bearer {predict}"}).status_code == 200
    assert get(f"{url}/v2").status_code == 401
    assert get(f"{url}/v2/models/{NAME}").status_code == 401
    assert (
        get(f"{url}/v2/health/live").status_code == 200 and get(f"{url}/v2/health/ready").status_code == 200
    )
    assert get(f"{url}/v3").status_code == 404  # not served: as without auth
    client = triton_http.InferenceServerClient(url=inference.http_address)
    try:
        assert client.is_model_ready(NAME, headers={"Authorization": f"Bearer {predict}"})
    finally:
        client.close()


def test_every_route_is_in_the_roles_table(served):
    inference, _ = served
    routes = {
        f"{route.method} {route.resource.canonical}"
        for route in inference.server.http.application().router.routes()
    }
    assert routes == set(HTTP_ROUTE_ROLES), "update shared/security/access.py HTTP_ROUTE_ROLES"


# ---------------------------------------------------------------- TLS


class Certificates:
    def __init__(self, root: Path):
        self.ca = CertificateAuthority.new("http-test-ca")
        self.ca_file = self.ca.write(root / "ca.pem")
        self.server = self.ca.issue("server", hosts=("127.0.0.1",)).write(root / "server")
        self.client = self.ca.issue("edge-gateway", client=True).write(root / "client")
        self.stranger = self.ca.issue("stranger", client=True).write(root / "stranger")


@pytest.fixture
def certificates(tmp_path) -> Certificates:
    return Certificates(tmp_path)


def test_https_with_the_services_certificate(checkpoints, start_inference, certificates):
    _, model = publish(checkpoints, seed=0)
    inference = start_inference(tls=ServerTLS(certificates.server["cert"], certificates.server["key"]))
    assert inference.http_url.startswith("https://")
    x = samples(2)

    answer = post(inference.http_url + INFER, json_request(x), verify=str(certificates.ca_file))

    got = np.array(answer.json()["outputs"][0]["data"], dtype=np.float32).reshape(2, 10)
    assert_close(got, core_probabilities(model, x))
    with pytest.raises(requests.exceptions.SSLError):
        get(inference.http_url + "/v2/health/live")  # the system's roots do not know our CA
    with pytest.raises(requests.ConnectionError):
        get(f"http://{inference.http_address}/v2/health/live")  # plaintext on the TLS port
    client = triton_http.InferenceServerClient(
        url=inference.http_address,
        ssl=True,
        ssl_options={"ca_certs": str(certificates.ca_file)},  # as the README shows it
    )
    try:
        assert client.is_server_ready()
        result = http_infer(client, x)
        assert_close(result.as_numpy("probabilities"), core_probabilities(model, x))
    finally:
        client.close()


def test_mutual_tls_and_a_client_certificate_that_stands_for_an_identity(
    checkpoints, start_inference, certificates, tmp_path
):
    publish(checkpoints, seed=0)
    tokens_file = tmp_path / "tokens.json"
    auth.allow_certificate(tokens_file, "edge-gateway", [auth.PREDICT])
    token = auth.issue(tokens_file, "ops", [auth.ADMIN])
    server = certificates.server
    inference = start_inference(
        tls=ServerTLS(server["cert"], server["key"], certificates.ca_file),
        auth=AccessSettings(tokens_file=str(tokens_file)),
    )
    verify = str(certificates.ca_file)

    def infer(pair, **headers) -> requests.Response:
        cert = (str(pair["cert"]), str(pair["key"]))
        return post(inference.http_url + INFER, json_request(samples(1)), headers, verify=verify, cert=cert)

    assert infer(certificates.client).status_code == 200  # its common name is in the tokens file
    stranger = infer(certificates.stranger)
    assert stranger.status_code == 401 and "'stranger' is not in the tokens file" in stranger.json()["error"]
    assert infer(certificates.stranger, Authorization=f"Bearer {token}").status_code == 200
    # No client certificate: the handshake fails (with TLS 1.3 the client learns it as the
    # server closes the connection, so not always as an SSLError).
    with pytest.raises(requests.ConnectionError):
        get(inference.http_url + "/v2/health/live", verify=verify)


def test_rotated_certificate_files_serve_new_connections(
    checkpoints, start_inference, certificates, tmp_path
):
    publish(checkpoints, seed=0)
    live = certificates.ca.issue("server", hosts=("127.0.0.1",)).write(tmp_path / "live")
    inference = start_inference(tls=ServerTLS(live["cert"], live["key"]))
    url = f"{inference.http_url}/v2/health/live"
    new_ca = CertificateAuthority.new("rotated-ca")
    new_ca_file = new_ca.write(tmp_path / "new-ca.pem")
    rotated = new_ca.issue("server", hosts=("127.0.0.1",))
    assert get(url, verify=str(certificates.ca_file)).status_code == 200

    replace_file(live["cert"], rotated.cert_pem)  # half a rotation: the old pair keeps serving
    assert get(url, verify=str(certificates.ca_file)).status_code == 200
    replace_file(live["key"], rotated.key_pem)

    def answers_with_the_new_certificate() -> bool:
        try:
            return get(url, verify=str(new_ca_file)).status_code == 200
        except requests.exceptions.SSLError:
            return False

    wait_until(answers_with_the_new_certificate, "the rotated certificate")
    with pytest.raises(requests.exceptions.SSLError):
        get(url, verify=str(certificates.ca_file))


# ---------------------------------------------------------------- settings and start


def test_the_setting_and_its_checks(monkeypatch):
    for name in (
        "INFER_LISTEN",
        "INFER_METRICS_PORT",
        "INFER_HEALTH_LISTEN",
        "INFER_HTTP_LISTEN",
        "INFER_WORKERS",
    ):
        monkeypatch.delenv(name, raising=False)
    assert InferConfig().http_listen == "127.0.0.1:8000"  # Triton's HTTP port
    monkeypatch.setenv("INFER_HTTP_LISTEN", "off")
    assert InferConfig().http_listen is None
    monkeypatch.setenv("INFER_HEALTH_LISTEN", "127.0.0.1:8086")
    for value, words in [
        ("8000", "INFER_HTTP_LISTEN='8000': must be HOST:PORT"),
        ("127.0.0.1:65536", "INFER_HTTP_LISTEN='127.0.0.1:65536': must be HOST:PORT"),
        ("::1:8000", "INFER_HTTP_LISTEN='::1:8000': an IPv6 address goes in brackets"),
        ("127.0.0.1:50052", "INFER_HTTP_LISTEN='127.0.0.1:50052': port 50052 is INFER_LISTEN's too"),
        ("0.0.0.0:9102", "INFER_HTTP_LISTEN='0.0.0.0:9102': port 9102 is INFER_METRICS_PORT's too"),
        ("127.0.0.1:8086", "INFER_HTTP_LISTEN='127.0.0.1:8086': port 8086 is INFER_HEALTH_LISTEN's too"),
    ]:
        monkeypatch.setenv("INFER_HTTP_LISTEN", value)
        with pytest.raises(ValueError) as refused:
            InferConfig()
        assert words in str(refused.value)


def test_a_taken_port_stops_the_start_naming_the_setting(private_redis):
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as another gRPC server holds it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(ValueError) as refused:
            InferenceServer(infer_config(private_redis.url, http_listen=address))
    assert f"INFER_HTTP_LISTEN={address!r}: cannot listen there" in str(refused.value)
    assert "Address already in use" in str(refused.value)


def test_off_means_no_http_port(start_inference):
    inference = start_inference(http_listen=None)  # INFER_HTTP_LISTEN=off
    assert inference.server.http is None and inference.http_url is None
    assert inference.serving("liveness")


def test_plaintext_on_a_network_address_is_logged_loudly_and_loopback_is_not(start_inference, caplog):
    for address, warned in (("127.0.0.1:0", False), ("0.0.0.0:0", True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tandem.tls"):
            inference = start_inference(http_listen=address)
        http_warnings = [
            r.getMessage() for r in caplog.records if "event=plaintext_on_network" in r.getMessage()
        ]
        http_warnings = [w for w in http_warnings if "HTTP WITHOUT TLS" in w]
        assert len(http_warnings) == warned, caplog.text
        assert all(f"listen={address}: HTTP WITHOUT TLS on a non-loopback" in w for w in http_warnings)
        # it serves (traffic to 127.0.0.1 only), warned or not
        assert get(f"http://127.0.0.1:{inference.server.http.port}/v2/health/live").status_code == 200


# ---------------------------------------------------------------- fuzz

ODD_VALUES: tuple[object, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1.5,
    2**70,
    "",
    "input",
    "FP32",
    [],
    {},
    [1],
    [[1]],
    1e308,
)


def mutated(document, rng: np.random.Generator):
    """`document` with one member or item somewhere replaced by an odd value, removed, or added."""
    if isinstance(document, (dict, list)) and document and rng.random() < 0.7:
        copy = dict(document) if isinstance(document, dict) else list(document)
        key = list(copy)[rng.integers(len(copy))] if isinstance(copy, dict) else int(rng.integers(len(copy)))
        choice = rng.random()
        if choice < 0.3:
            del copy[key]
        elif choice < 0.6:
            copy[key] = ODD_VALUES[rng.integers(len(ODD_VALUES))]
        else:
            copy[key] = mutated(copy[key], rng)
        return copy
    return ODD_VALUES[rng.integers(len(ODD_VALUES))] if rng.random() < 0.3 else document


def test_mutated_requests_are_answered_or_refused_never_a_500(served):
    inference, _ = served
    rng = np.random.default_rng(0)
    x = samples(2)
    valid = {
        "id": "a",
        "parameters": {"binary_data_output": False},
        "inputs": [{"name": "input", "shape": [2, 1, 8, 8], "datatype": "FP32", "data": x.tolist()}],
        "outputs": [{"name": "classes", "parameters": {"binary_data": True}}],
    }
    statuses: set[int] = set()
    with requests.Session() as session:
        for _ in range(500):
            body, headers = json.dumps(mutated(mutated(valid, rng), rng)).encode(), {}
            if rng.random() < 0.2:  # some raw bytes after it, which the JSON may or may not claim
                headers["Inference-Header-Content-Length"] = str(len(body))
                body += x.tobytes()[: rng.integers(1024)]
            answer = session.post(inference.http_url + INFER, data=body, headers=headers, timeout=DEADLINE)
            statuses.add(answer.status_code)
            if answer.status_code != 200:
                assert isinstance(answer.json()["error"], str) and answer.json()["error"], answer.text
    assert statuses <= {200, 400}, statuses
    assert {200, 400} <= statuses  # the mutations reach both sides
    assert post(inference.http_url + INFER, valid).status_code == 200
