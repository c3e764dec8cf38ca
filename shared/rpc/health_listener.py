"""grpc.health.v1 alone, in plaintext, on a port of its own: for probes that cannot speak TLS.

Kubernetes' native gRPC probes (`grpc:` in a probe, GA since 1.27) connect
to the pod's IP in plaintext and send no token, and they count only SERVING.
The services serve TLS on their one gRPC port once TANDEM_TLS_CERT is set,
so those probes cannot ask it. TRAINER_HEALTH_LISTEN / INFER_HEALTH_LISTEN
(HOST:PORT; unset = no such listener) open this second one beside it.

It serves the Health service and nothing else: no servicer of the service,
no reflection, so any other method is UNIMPLEMENTED there, and no token is
asked for (health never needs one on the main port either). It answers
from the main server's statuses (HealthServicer.serving_elsewhere), so the
two never disagree. What it shows anyone who reaches it is what the probes
need: the names of the service and its models, and whether they serve.

It starts and stops with the main server (shared.rpc.server.GrpcService):
from the start of a graceful stop it answers NOT_SERVING while calls in
flight drain on the main port, and it closes once the main server has stopped.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2_grpc

from shared.rpc.health import HealthServicer
from shared.rpc.request_guard import UnparsableRequests

log = logging.getLogger("tandem.health")
# A probe's Check is answered at once: a few threads are plenty. A quarter of them may hold
# a Watch (HealthServicer.for_workers), so Checks always find a thread.
WORKERS = 8
WORKERS_SETTING = "shared.rpc.health_listener.WORKERS"  # named in a refused Watch's message
MAX_MESSAGE_BYTES = 64 * 2**10  # a HealthCheckRequest is a service name


def listen_address(raw: str) -> str:
    """ "0.0.0.0:8086", "[::]:8086", "localhost:0" (0: any free port) as given, once checked.

    gRPC itself takes "HOST:99999" or "HOST:" and binds some other port
    without a word, which a probe aimed at the port meant would never find.
    """
    host, colon, port = raw.rpartition(":")
    if not colon or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ValueError("must be HOST:PORT with a port from 0 to 65535 (0.0.0.0:8086, [::]:8086)")
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise ValueError(f"{host} is not an IPv6 address in brackets") from None
    elif ":" in host:
        raise ValueError(f"an IPv6 address goes in brackets: [{host}]:{port}")
    return raw


def port_of(address: str) -> int | None:
    """The port of a HOST:PORT address; None for what has none (a unix: socket)."""
    port = address.rpartition(":")[2]
    return int(port) if port.isdigit() else None


def bind_tcp(address: str, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to `address` (HOST:PORT, checked by listen_address; port 0: a free one),
    not yet listening. `reuse_port`: SO_REUSEPORT, so that other processes of this program can
    bind the port too (infer_svc.workers). OSError (or ValueError) if it cannot be bound."""
    host, _, port = address.rpartition(":")
    family, kind, protocol, _, where = socket.getaddrinfo(
        host.removeprefix("[").removesuffix("]"), int(port), type=socket.SOCK_STREAM
    )[0]
    bound = socket.socket(family, kind, protocol)
    try:
        # A restart need not wait out the last run's connections in TIME_WAIT; on Linux this
        # never lets two listening sockets share a port (SO_REUSEPORT does, on purpose).
        bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            bound.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        bound.bind(where)
    except OSError:
        bound.close()
        raise
    return bound


def check_own_port(setting: str, address: str | None, others: dict[str, int | None]) -> None:
    """ValueError unless `address` (set by `setting`) has a port none of `others` (setting ->
    port, 0 or None = none) has: the service's own ports would clash at start."""
    port = port_of(address) if address else None
    for other, taken in others.items():
        if port and port == taken:
            raise ValueError(
                f"{setting}={address!r}: port {port} is {other}'s too; give it a port of its own"
            )


class HealthListener:
    """`health`'s statuses over plaintext grpc.health.v1 at `address`, bound now, served from `start`."""

    def __init__(self, address: str, setting: str, health: HealthServicer, shares_port: bool = False):
        self.address = address
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="grpc-health"),
            interceptors=(UnparsableRequests(),),
            maximum_concurrent_rpcs=WORKERS * 4,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                # gRPC binds with SO_REUSEPORT by default: a port another server of this host
                # holds the same way (the main server, say) would be shared without an error,
                # and half of its connections would come here. Refused instead, unless the
                # other holders are this program's own workers (infer_svc.workers).
                ("grpc.so_reuseport", int(shares_port)),
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(
            health.serving_elsewhere(WORKERS, WORKERS_SETTING), self.server
        )
        try:
            self.port = self.server.add_insecure_port(address)
        except RuntimeError as error:  # grpc says no more than "Failed to bind to address ..."
            raise ValueError(
                f"{setting}={address!r}: cannot listen there (the port is in use, or the "
                f"host is not an address of this machine): {error}"
            ) from None

    def start(self) -> None:
        self.server.start()
        log.info(
            "event=health_listener_started listen=%s port=%d plaintext grpc.health.v1 only",
            self.address,
            self.port,
        )

    def stop(self) -> None:
        """Close at once: what it answers is over when the main server has stopped."""
        self.server.stop(0).wait()
