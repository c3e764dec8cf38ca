"""The trainer process: gRPC server, health, reflection, metrics, and graceful shutdown.

`TrainerServer` wires the parts together (store, job records, datasets,
job manager, servicer) so that tests start a real server in-process and
`python -m trainer_svc` runs the same thing until SIGTERM.
"""

from __future__ import annotations

import logging
import threading
import time

from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.security.access import AccessInterceptor
from shared.security.auth import UNRESTRICTED
from shared.rpc.health import HealthServicer
from shared.checkpoints.redis_client import connect
from shared.rpc.stubs import tandem_trainer_pb2, tandem_trainer_pb2_grpc
from shared.rpc.server import (MetricsEndpoint, configure_logging, enable_reflection, grpc_server,
                            run_until_signalled)
from shared.checkpoints.store import CheckpointStore
from shared.security.tls import listen
from trainer_svc import metrics
from trainer_svc.config import TrainerConfig
from trainer_svc.datasets import DatasetCatalog
from trainer_svc.job_store import JobRepository
from trainer_svc.manager import JobManager, Settings
from trainer_svc.servicer import TrainerServicer

log = logging.getLogger("tandem.trainer")
SERVICE = tandem_trainer_pb2.DESCRIPTOR.services_by_name["Trainer"]
SERVICE_NAME = SERVICE.full_name
HEALTH_SERVICES = ("", SERVICE_NAME)   # "" = the server as a whole
MAX_MESSAGE_BYTES = 8 * 2**20


class TrainerServer:
    def __init__(self, config: TrainerConfig):
        self.config = config
        client = connect(config.redis_url)
        self.manager = JobManager(
            CheckpointStore(client, retention=config.checkpoint_retention),
            JobRepository(client),
            DatasetCatalog(client, config.data_dir, max_upload_bytes=config.max_upload_bytes,
                           max_classes=config.max_classes),
            Settings(max_concurrent=config.max_concurrent_jobs,
                     outage_limit=config.publish_outage_seconds,
                     max_restarts=config.max_restarts,
                     resume_interrupted=config.resume_interrupted, limits=config.job_limits))
        self.health = HealthServicer.for_workers(config.grpc_workers, "TRAINER_GRPC_WORKERS")
        for service in HEALTH_SERVICES:   # known from the first call on; SERVING once started
            self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server = grpc_server(config.grpc_workers, MAX_MESSAGE_BYTES,
                                  interceptors=[AccessInterceptor(config.auth, "trainer")])
        tandem_trainer_pb2_grpc.add_TrainerServicer_to_server(TrainerServicer(self.manager), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if config.auth.reflection_served:   # TANDEM_REFLECTION=off: not served
            enable_reflection(self.server, SERVICE)
        self.port = listen(self.server, config.listen, config.tls)
        self.metrics_http = None
        self._stopped = threading.Event()

    def start(self) -> "TrainerServer":
        self.manager.start()
        if self.config.metrics_port:
            self.metrics_http = MetricsEndpoint(self.config.metrics_port, self.config.metrics_address)
            self._job_states = metrics.register_job_states(
                lambda: (r.state.value for r in self.manager.list(UNRESTRICTED)))
        self.server.start()
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("event=trainer_started listen=%s port=%d metrics_port=%d", self.config.listen,
                 self.port, self.config.metrics_port)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop taking work, let running jobs checkpoint at a step boundary, then exit."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.config.grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        self.health.enter_graceful_shutdown()
        log.info("event=trainer_stopping grace=%.1fs", grace)
        self.manager.shutdown(grace)
        self.server.stop(max(0.0, deadline - time.monotonic())).wait()
        if self.metrics_http:
            self.metrics_http.close()
            metrics.unregister_job_states(self._job_states)
        log.info("event=trainer_stopped")

    def wait(self) -> None:
        self._stopped.wait()


def main() -> None:
    configure_logging()
    run_until_signalled(TrainerServer(TrainerConfig()).start())
