"""How a client reaches a server: `Connection` (TLS and a bearer token), the channel it opens,
and `ServiceClient`, the base of TrainerClient and InferenceClient (channel, health, closing).

A Connection comes from the environment unless given: TLS from TANDEM_TLS_CA,
TANDEM_TLS_CLIENT_CERT/KEY and TANDEM_TLS (shared/security/tls.py), and a
bearer token from TANDEM_TOKEN or TANDEM_TOKEN_FILE, sent as
`authorization: Bearer TOKEN` metadata with every call:

    connection = Connection(ClientTLS(ca=Path("ca.pem")), token=read_token_file("alice.token"))
    with TrainerClient("trainer.example:50051", connection=connection) as trainer:
        ...
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.env import env
from shared.security.tls import ClientTLS
from shared.security.tls import channel as tls_channel

# ---------------------------------------------------------------- the bearer token


def read_token_file(path: str | Path) -> str:
    """The bearer token in a file (surrounding whitespace stripped); never echoed in an error."""
    token = Path(path).read_text(encoding="ascii", errors="replace").strip()
    if not token:
        raise ValueError(f"{path}: the token file is empty")
    if not all("!" <= character <= "~" for character in token):
        raise ValueError(f"{path}: a token is printable ASCII without spaces; this file holds more")
    return token


def token_from_env() -> str | None:
    """TANDEM_TOKEN, or the token in the file TANDEM_TOKEN_FILE names; None without either."""
    token, token_file = env("TANDEM_TOKEN", None), env("TANDEM_TOKEN_FILE", None)
    if token is not None and token_file is not None:
        raise ValueError("set TANDEM_TOKEN or TANDEM_TOKEN_FILE, not both")
    if token_file is not None:
        try:
            return read_token_file(token_file)
        except (OSError, ValueError) as error:
            reason = error.strerror if isinstance(error, OSError) else error
            raise ValueError(f"TANDEM_TOKEN_FILE={token_file!r}: {reason}") from None
    return token


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer TOKEN` to every call's metadata.

    An interceptor rather than grpc's call credentials: those refuse to
    travel on a plaintext channel, and a token must work on both (on
    127.0.0.1 TLS is optional).
    """

    def __init__(self, token: str):
        self._metadata = ("authorization", f"Bearer {token}")

    def __repr__(self) -> str:
        return "BearerToken(...)"

    def _with_token(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._metadata],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    intercept_stream_stream = intercept_stream_unary


# ---------------------------------------------------------------- the connection


@dataclass(frozen=True)
class Connection:
    """How a client reaches a server: TLS (None: plaintext) and the bearer token sent with every
    call (None: none). `Connection()` is plaintext without a token."""

    tls: ClientTLS | None = None
    token: str | None = field(default=None, repr=False)  # a secret: never in a repr or a log

    @classmethod
    def from_env(cls) -> Connection:
        return cls(ClientTLS.from_env(), token_from_env())

    def channel(self, target: str, options: list | None = None) -> grpc.Channel:
        channel = tls_channel(target, self.tls, options)
        if self.token is None:
            return channel
        return grpc.intercept_channel(channel, BearerToken(self.token))


class ServiceClient:
    """A channel to one server of `service`; `timeout` bounds each unary call. `connection`:
    TLS and token (default: from the environment, Connection.from_env).

    A subclass's methods turn Python values into the request message, make
    one call and return the response's messages as they are; every check
    happens on the server. A failed call raises grpc.RpcError with the
    server's status code and message.
    """

    service: str  # the full service name that grpc.health.v1 reports on

    def __init__(
        self,
        target: str,
        timeout: float = 30.0,
        connection: Connection | None = None,
        options: list | None = None,
    ):
        self.target = target
        self.timeout = timeout
        if connection is None:
            connection = Connection.from_env()
        self._channel = connection.channel(target, options)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls still in progress (a watch) are cancelled."""
        self._channel.close()

    def wait_until_ready(self, timeout: float) -> None:
        """Wait until the server reports SERVING for its service on grpc.health.v1.

        Follows the health status as a stream (no polling), waiting for the
        server to come up if it is not there yet; raises grpc.RpcError
        (DEADLINE_EXCEEDED) if it is not serving within `timeout` seconds. A
        trainer serves once started; an inference server once every model it
        is configured with serves (with none configured, once any model does).
        """
        wait_until_serving(self._health, self.service, timeout)


def wait_until_serving(health: health_pb2_grpc.HealthStub, service: str, timeout: float) -> None:
    """Follow `service`'s health status until SERVING; DEADLINE_EXCEEDED after `timeout` seconds."""
    statuses = health.Watch(
        health_pb2.HealthCheckRequest(service=service), timeout=timeout, wait_for_ready=True
    )
    try:
        for status in statuses:
            if status.status == health_pb2.HealthCheckResponse.SERVING:
                return
    finally:
        statuses.cancel()
