"""The inference process: gRPC server, health, reflection, metrics, and graceful shutdown.

`InferenceServer` wires the parts together (store, registry, version
source, batcher, predictor, and the two servicers: Tandem's Inference and
the Open Inference Protocol's GRPCInferenceService) so that tests start a
real server in-process and `python -m infer_svc` runs the same thing until
SIGTERM. Stopping is shared.rpc.server.GrpcService's; what is the inference
server's own is closing the batcher, the version source and the registry
once the gRPC server has stopped.

Liveness and readiness: the server answers as soon as it starts, and is
live ("liveness" SERVING, shared.rpc.health.LIVENESS); it is ready
(grpc.health.v1 SERVING for "" and the service names, ServerReady true)
once every configured model serves (Triton's strict readiness), or, with
none configured, once a first model serves; NOT_SERVING again from the
start of a shutdown. Each model also has a health entry under its own name,
SERVING once a version of it serves. With INFER_HEALTH_LISTEN the same
statuses are served in plaintext on a port of their own, for probes
(shared.rpc.health_listener).

The Open Inference Protocol is also served over HTTP/REST, as Triton serves
it beside gRPC: INFER_HTTP_LISTEN (default 127.0.0.1:8000; "off" = none)
opens that port (infer_svc.http) with the same predictor, batching, tokens,
TLS files and metrics. It starts once gRPC serves; from the start of a stop
its readiness is 503, and it closes once its calls in flight have ended.

`python -m infer_svc` (infer_svc.__main__) runs INFER_WORKERS such servers
(default: one per usable core) as processes sharing the ports, under a
supervisor that serves their metrics (infer_svc.workers).
"""

from __future__ import annotations

import logging
import time

from grpc_health.v1 import health_pb2, health_pb2_grpc

from infer_svc import metrics
from infer_svc.batching import Batcher
from infer_svc.config import InferConfig
from infer_svc.http import HttpListener
from infer_svc.kserve import KServeServicer
from infer_svc.predict import Predictor
from infer_svc.registry import Registry
from infer_svc.servable import Servable
from infer_svc.servicer import InferenceServicer
from infer_svc.source import VersionSource
from shared.checkpoints.redis_client import connect
from shared.checkpoints.store import CheckpointStore
from shared.rpc.health import HealthServicer
from shared.rpc.server import GrpcService, MetricsEndpoint, enable_reflection, grpc_server
from shared.rpc.stubs import (
    grpc_service_pb2,
    grpc_service_pb2_grpc,
    tandem_inference_pb2,
    tandem_inference_pb2_grpc,
)
from shared.security.access import AccessInterceptor
from shared.security.tls import listen

log = logging.getLogger("tandem.infer")
SERVICE = tandem_inference_pb2.DESCRIPTOR.services_by_name["Inference"]
KSERVE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME, KSERVE_SERVICE_NAME = SERVICE.full_name, KSERVE_SERVICE.full_name
HEALTH_SERVICES = ("", SERVICE_NAME, KSERVE_SERVICE_NAME)  # "" = the server as a whole


class InferenceServer(GrpcService):
    """One server process. `shares_ports`: it is one of INFER_WORKERS processes listening on the
    same ports (infer_svc.workers)."""

    def __init__(self, config: InferConfig, shares_ports: bool = False):
        self.config = config
        self.store = CheckpointStore(connect(config.redis_url))
        health = HealthServicer.for_workers(config.grpc_workers, "INFER_GRPC_WORKERS")
        for service in (*HEALTH_SERVICES, *config.models):  # each model has an entry of its own
            health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        server = grpc_server(
            config.grpc_workers,
            config.max_message_bytes,
            interceptors=[AccessInterceptor(config.auth, "inference")],
            max_connection_age=config.max_connection_age_seconds,
            max_connection_age_grace=config.grace_seconds,
            shares_port=shares_ports,
        )
        super().__init__(
            "infer",
            server,
            health,
            config.grace_seconds,
            config.health_listen,
            "INFER_HEALTH_LISTEN",
            shares_ports,
        )
        self.registry = Registry(
            self.store,
            models=config.models,
            pinned=config.pinned,
            on_loaded=metrics.record_loaded,
            on_failed=metrics.record_failed,
            on_swapped=self._swapped,
        )
        self.batcher = Batcher(
            enabled=config.batching,
            max_batch_size=config.max_batch_size,
            max_delay=config.max_queue_delay_ms / 1000,
            max_queue_rows=config.max_queue_rows,
            on_batch=metrics.record_batch,
        )
        self.predictor = Predictor(self.registry, self.batcher, max_rows=config.max_rows)
        self.source = VersionSource(self.store, self.registry, poll_interval=config.poll_seconds)
        tandem_inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.predictor), server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(self.predictor), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        if config.auth.reflection_served:  # TANDEM_REFLECTION=off: not served
            enable_reflection(server, SERVICE, KSERVE_SERVICE)
        self.port = listen(server, config.listen, config.tls)
        self.http = HttpListener(config, self.predictor, shares_ports) if config.http_listen else None
        self._stop_deadline = 0.0  # when the grace period of a stop begun ends

    def start(self) -> InferenceServer:
        self.metrics_http = MetricsEndpoint(self.config.metrics_port, self.config.metrics_address)
        self._serve()
        if self.http:
            self.http.start()
        self.registry.load_configured()
        self.source.start()
        log.info(
            "event=infer_started listen=%s port=%d http_port=%s models=%s metrics_port=%d health_port=%s",
            self.config.listen,
            self.port,
            self.http.port if self.http else "none",
            ",".join(self.config.models) or "any",
            self.config.metrics_port,
            self.health_listener.port if self.health_listener else "none",
        )
        return self

    def _drain(self, grace: float) -> None:
        """At the start of a stop: HTTP readiness is 503 from now, as gRPC health is NOT_SERVING."""
        self._stop_deadline = time.monotonic() + grace
        if self.http:
            self.http.begin_stop()

    def _close(self) -> None:
        if self.http:  # its calls in flight still need the batcher
            self.http.stop(max(0.0, self._stop_deadline - time.monotonic()))
        self.batcher.stop()
        self.source.stop()
        self.registry.close()

    def _swapped(self, servable: Servable) -> None:
        metrics.record_swapped(servable)
        self.health.set(servable.name, health_pb2.HealthCheckResponse.SERVING)
        if self.registry.ready:  # the last configured model to serve makes the server ready
            for service in HEALTH_SERVICES:
                self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
