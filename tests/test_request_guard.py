"""Bytes that do not parse as the request message: INVALID_ARGUMENT from us, and the server still stops.

Real inference server in-process on 127.0.0.1, real embedded Redis; calls
send raw bytes with no serializer, as a hostile client would.
"""

import threading

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from infer_svc.server import InferenceServer
from tests.inference_harness import infer_config

NOT_A_MESSAGE = b"\xff\xff"  # a field with tag 0x7f... and no value: no message parses from it
STOP_BOUND = 20.0  # seconds for stop(grace=1) to return


@pytest.fixture
def server(private_redis):
    server = InferenceServer(infer_config(private_redis.url)).start()
    yield server
    server.stop(0)


def raw_channel(server) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{server.port}")


@pytest.mark.parametrize(
    "method",
    [
        "/tandem.v1.Inference/Predict",
        "/inference.GRPCInferenceService/ModelInfer",
        "/grpc.health.v1.Health/Check",
    ],
)
def test_a_unary_request_that_does_not_parse_is_invalid_argument_naming_the_method(server, method):
    with raw_channel(server) as channel, pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(method)(NOT_A_MESSAGE, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"not a valid message for {method}" in caught.value.details()


def test_a_stream_whose_first_message_does_not_parse_leaves_a_server_that_stops(server):
    # grpcio alone answers INTERNAL here, and after a few such calls server.stop() never returns.
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    good = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    with raw_channel(server) as channel:
        for messages in [[NOT_A_MESSAGE]] * 5 + [[good, NOT_A_MESSAGE]]:
            call = channel.stream_stream(method)(iter(messages), timeout=10)
            with pytest.raises(grpc.RpcError) as caught:
                list(call)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stopping = threading.Thread(target=server.stop, args=(1.0,))
    stopping.start()
    stopping.join(STOP_BOUND)
    assert not stopping.is_alive(), f"stop(grace=1) had not returned after {STOP_BOUND} s"
