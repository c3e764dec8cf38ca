"""What the two service processes (trainer, inference) run the same way: gRPC server, metrics
endpoint, logging, graceful stop (GrpcService) and SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from concurrent import futures
from typing import Protocol

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from shared.rpc.health import LIVENESS, HealthServicer
from shared.rpc.health_listener import HealthListener
from shared.rpc.request_guard import UnparsableRequests


class Service(Protocol):
    server: grpc.Server

    def stop(self, grace: float | None = None) -> None: ...

    def wait(self) -> None: ...


GRPC_MAX_MILLISECONDS = 2**31 - 1  # gRPC's time options are C ints: about 24.8 days


def grpc_server(
    workers: int,
    max_message_bytes: int,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    max_connection_age: float = 0.0,
    max_connection_age_grace: float = 0.0,
    shares_port: bool = False,
) -> grpc.Server:
    """A gRPC server on `workers` threads; calls beyond 4 per thread are refused (RESOURCE_EXHAUSTED).

    `interceptors` see every call first (the access check, shared.security.access); then
    shared.rpc.request_guard answers a request that does not parse (INVALID_ARGUMENT).
    `max_connection_age` (seconds; 0 = never): a connection that old is sent GOAWAY, and
    closed once its calls in flight have ended or `max_connection_age_grace` is over.
    `shares_port`: other processes of this program listen on the same port (SO_REUSEPORT,
    infer_svc.workers); otherwise a port that another server holds is refused at bind.
    """
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # gRPC binds with SO_REUSEPORT unless told not to: a second server started on a port
        # already served would share it without an error, and take half of its connections.
        ("grpc.so_reuseport", int(shares_port)),
    ]
    if max_connection_age:
        grace_ms = min(max(0, round(max_connection_age_grace * 1000)), GRPC_MAX_MILLISECONDS)
        options += [
            ("grpc.max_connection_age_ms", round(max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", grace_ms),
        ]
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        interceptors=(*interceptors, UnparsableRequests()),
        maximum_concurrent_rpcs=workers * 4,
        options=options,
    )


class MetricsEndpoint:
    """Prometheus metrics over HTTP (`/metrics`) on `address:port`; port 0 means none.

    `registry`: what to serve, by default this process's metrics (infer_svc.workers serves
    its workers' instead)."""

    def __init__(self, port: int, address: str, registry: CollectorRegistry = REGISTRY):
        self._http = start_http_server(port, addr=address, registry=registry)[0] if port else None

    def close(self) -> None:
        """Stop serving and free the port (for a server started after this one)."""
        if self._http:
            self._http.shutdown()
            self._http.server_close()


class GrpcService:
    """A service process's gRPC server and health, stopped gracefully, once (what run_until_signalled runs).

    A subclass builds its parts, hands its `server` and `health` over here, serves metrics
    through `metrics_http` if it likes, starts serving with `_serve`, and says what else is
    its own to stop: `_drain` before the server stops (the trainer's running jobs), `_close`
    once it has stopped. With `health_listen` (HOST:PORT, set by `health_setting`) the health
    statuses are served in plaintext there too (shared.rpc.health_listener), for probes.
    """

    def __init__(
        self,
        name: str,
        server: grpc.Server,
        health: HealthServicer,
        grace_seconds: float,
        health_listen: str | None = None,
        health_setting: str = "",
        shares_ports: bool = False,
    ):
        self.server, self.health = server, health
        health.set(LIVENESS, health_pb2.HealthCheckResponse.NOT_SERVING)  # known from the first call on
        self.health_listener = (
            HealthListener(health_listen, health_setting, health, shares_ports) if health_listen else None
        )
        self.metrics_http: MetricsEndpoint | None = None
        self._name, self._grace_seconds = name, grace_seconds  # name: "trainer" logs event=trainer_...
        self._log = logging.getLogger(f"tandem.{name}")
        self._stopped = threading.Event()

    def _serve(self) -> None:
        """Start the gRPC server and the health listener: from now on the process is live."""
        self.server.start()
        if self.health_listener:
            self.health_listener.start()
        self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Stop taking work (health NOT_SERVING), drain, give calls in flight until `grace` seconds
        (None: the configured grace) are up, then stop the rest. Later calls do nothing."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self._grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        self.health.enter_graceful_shutdown()
        self._log.info("event=%s_stopping grace=%.1fs", self._name, grace)
        self._drain(grace)
        self.server.stop(max(0.0, deadline - time.monotonic())).wait()
        if self.health_listener:  # NOT_SERVING there until now: probes saw the stop begin
            self.health_listener.stop()
        self._close()
        if self.metrics_http:
            self.metrics_http.close()
        self._log.info("event=%s_stopped", self._name)

    def wait(self) -> None:
        """Return once `stop` has begun."""
        self._stopped.wait()

    def _drain(self, grace: float) -> None:
        """What must end before the gRPC server stops, within `grace` seconds; nothing by default."""

    def _close(self) -> None:
        """What to stop once the gRPC server has stopped; nothing by default."""


def enable_reflection(server: grpc.Server, *services: ServiceDescriptor) -> None:
    """Server reflection for `services`, grpc.health.v1 and reflection itself.

    Reflection reads one descriptor pool, and the services' descriptors live
    in two (the Open Inference Protocol's in a private pool of its own, see
    shared/rpc/stubs/grpc_service_pb2.py): a pool for reflection alone gets a copy
    of every file they need.
    """
    services = (
        *services,
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    )
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:  # a file's imports go into the pool first
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for service in services:
        add(service.file)
    reflection.enable_server_reflection([service.full_name for service in services], server, pool=pool)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")


def run_until_signalled(service: Service) -> None:
    """Serve a started service until SIGTERM or SIGINT, then stop it gracefully and return."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: threading.Thread(target=service.stop).start())
    service.wait()
    service.server.wait_for_termination()
