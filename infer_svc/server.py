"""The inference process: gRPC server, health, reflection, metrics, and graceful shutdown.

`InferenceServer` wires the parts together (store, registry, version
source, batcher, predictor, and the two servicers: Tandem's Inference and
the Open Inference Protocol's GRPCInferenceService) so that tests start a
real server in-process and `python -m infer_svc` runs the same thing until
SIGTERM.

Liveness and readiness: the server answers as soon as it starts; it is
ready (grpc.health.v1 SERVING for "" and the service names, ServerReady
true) once every configured model serves (Triton's strict readiness), or,
with none configured, once a first model serves; NOT_SERVING again from the
start of a shutdown. Each model also has a health entry under its own name,
SERVING once a version of it serves.
"""

from __future__ import annotations

import logging
import threading

from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.security.access import AccessInterceptor
from shared.rpc.health import HealthServicer
from shared.checkpoints.redis_client import connect
from shared.rpc.stubs import grpc_service_pb2, grpc_service_pb2_grpc
from shared.rpc.stubs import tandem_inference_pb2, tandem_inference_pb2_grpc
from shared.rpc.server import (MetricsEndpoint, configure_logging, enable_reflection, grpc_server,
                            run_until_signalled)
from shared.checkpoints.store import CheckpointStore
from shared.security.tls import listen
from infer_svc import metrics
from infer_svc.batching import Batcher
from infer_svc.config import InferConfig
from infer_svc.kserve import KServeServicer
from infer_svc.predict import Predictor
from infer_svc.registry import Registry
from infer_svc.servable import Servable
from infer_svc.servicer import InferenceServicer
from infer_svc.source import VersionSource

log = logging.getLogger("tandem.infer")
SERVICE = tandem_inference_pb2.DESCRIPTOR.services_by_name["Inference"]
KSERVE_SERVICE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME, KSERVE_SERVICE_NAME = SERVICE.full_name, KSERVE_SERVICE.full_name
HEALTH_SERVICES = ("", SERVICE_NAME, KSERVE_SERVICE_NAME)   # "" = the server as a whole


class InferenceServer:
    def __init__(self, config: InferConfig):
        self.config = config
        self.store = CheckpointStore(connect(config.redis_url))
        self.health = HealthServicer.for_workers(config.grpc_workers, "INFER_GRPC_WORKERS")
        for service in (*HEALTH_SERVICES, *config.models):   # each model has an entry of its own
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.registry = Registry(self.store, models=config.models, pinned=config.pinned,
                                 on_loaded=metrics.record_loaded, on_failed=metrics.record_failed,
                                 on_swapped=self._swapped)
        self.batcher = Batcher(enabled=config.batching, max_batch_size=config.max_batch_size,
                               max_delay=config.max_queue_delay_ms / 1000,
                               max_queue_rows=config.max_queue_rows, on_batch=metrics.record_batch)
        self.predictor = Predictor(self.registry, self.batcher, max_rows=config.max_rows)
        self.source = VersionSource(self.store, self.registry, poll_interval=config.poll_seconds)
        self.server = grpc_server(config.grpc_workers, config.max_message_bytes,
                                  interceptors=[AccessInterceptor(config.auth, "inference")])
        tandem_inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(self.predictor),
                                                                  self.server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(self.predictor),
                                                                         self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if config.auth.reflection_served:   # TANDEM_REFLECTION=off: not served
            enable_reflection(self.server, SERVICE, KSERVE_SERVICE)
        self.port = listen(self.server, config.listen, config.tls)
        self.metrics_http = None
        self._stopped = threading.Event()

    def start(self) -> "InferenceServer":
        self.metrics_http = MetricsEndpoint(self.config.metrics_port, self.config.metrics_address)
        self.server.start()
        self.registry.load_configured()
        self.source.start()
        log.info("event=infer_started listen=%s port=%d models=%s metrics_port=%d", self.config.listen,
                 self.port, ",".join(self.config.models) or "any", self.config.metrics_port)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let those in flight finish within `grace` seconds, then stop the rest."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.grace_seconds if grace is None else grace
        self.health.enter_graceful_shutdown()
        log.info("event=infer_stopping grace=%.1fs", grace)
        self.server.stop(grace).wait()
        self.batcher.stop()
        self.source.stop()
        self.registry.close()
        if self.metrics_http:
            self.metrics_http.close()
        log.info("event=infer_stopped")

    def wait(self) -> None:
        self._stopped.wait()

    def _swapped(self, servable: Servable) -> None:
        metrics.record_swapped(servable)
        self.health.set(servable.name, health_pb2.HealthCheckResponse.SERVING)
        if self.registry.ready:   # the last configured model to serve makes the server ready
            for service in HEALTH_SERVICES:
                self.health.set(service, health_pb2.HealthCheckResponse.SERVING)


def main() -> None:
    configure_logging()
    run_until_signalled(InferenceServer(InferConfig()).start())
