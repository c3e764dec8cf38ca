"""Calling any gRPC method with raw bytes, and finding every method a server serves.

`served_methods(channel)` asks the server's reflection which services it
serves and reads their descriptors from it, so the fuzz tier covers a new
RPC or service without an edit. `call(channel, method, request)` sends a
FuzzRequest's messages as they are (no serialiser) with a deadline, in the
method's own shape: a client stream sends every message, a server stream is
read for a few messages and then cancelled.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.fuzz_inputs import FuzzRequest

STREAM_READ = 3  # messages read from a server stream, at most
STREAM_LINGER = 0.2  # seconds a stream may take for more messages after its first, then cancelled
CANCELLED_BY_CLIENT = "CANCELLED by the client"  # a stream we cancelled ourselves: not the server's answer


@dataclass(frozen=True)
class Outcome:
    status: str  # a grpc.StatusCode name, or CANCELLED_BY_CLIENT
    details: str
    response: bytes | None  # the (first) response message, for a call that succeeded
    seconds: float


def path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def served_methods(channel: grpc.Channel) -> list[MethodDescriptor]:
    """Every method of every service the server's reflection lists, by service and method name."""
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = DescriptorPool(database)
    return [
        method for name in sorted(database.get_services()) for method in pool.FindServiceByName(name).methods
    ]


def call(channel: grpc.Channel, method: MethodDescriptor, request: FuzzRequest, deadline: float) -> Outcome:
    """Send `request` to `method` as raw bytes, within `deadline` seconds, and say how it ended."""
    started = time.monotonic()
    name = path(method)
    try:
        if not method.server_streaming:
            if method.client_streaming:
                response = channel.stream_unary(name)(iter(request.messages), timeout=deadline)
            else:
                response = channel.unary_unary(name)(request.messages[0], timeout=deadline)
            return Outcome("OK", "", response, time.monotonic() - started)
        if method.client_streaming:
            stream = channel.stream_stream(name)(iter(request.messages), timeout=deadline)
        else:
            stream = channel.unary_stream(name)(request.messages[0], timeout=deadline)
        return read_some(stream, started)
    except grpc.RpcError as error:
        return Outcome(error.code().name, error.details() or "", None, time.monotonic() - started)


def read_some(stream, started: float) -> Outcome:
    """Read up to STREAM_READ messages, lingering STREAM_LINGER s for more after the first; then cancel."""
    cancelled = threading.Event()

    def cancel() -> None:
        cancelled.set()
        stream.cancel()

    timer = threading.Timer(STREAM_LINGER, cancel)
    first, count = None, 0
    try:
        for response in stream:
            if count == 0:
                first = response
                timer.start()
            count += 1
            if count >= STREAM_READ:
                break
        else:
            return Outcome("OK", "", first, time.monotonic() - started)  # the server ended it
        cancel()
    except grpc.RpcError as error:
        if not cancelled.is_set():
            return Outcome(error.code().name, error.details() or "", None, time.monotonic() - started)
    finally:
        timer.cancel()
    return Outcome(CANCELLED_BY_CLIENT, "", first, time.monotonic() - started)
