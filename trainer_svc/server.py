"""The trainer process: gRPC server, health, reflection, metrics, and graceful shutdown.

`TrainerServer` wires the parts together (store, job repository, datasets,
request validator, job runner, job manager, servicer) from one TrainerConfig,
so that tests start a real server in-process and `python -m trainer_svc`
runs the same thing until SIGTERM. Stopping is shared.rpc.server.GrpcService's;
what is the trainer's own is letting running jobs checkpoint first.

The trainer serves as soon as it starts, with or without its Redis; its
work (the job manager) starts once Redis answers (trainer_svc.redis_wait).
Health: "liveness" (shared.rpc.health.LIVENESS) is SERVING from the start,
"" and tandem.v1.Trainer once the work has started; all NOT_SERVING from the
start of a shutdown. With TRAINER_HEALTH_LISTEN they are served in plaintext
on a port of their own too, for probes (shared.rpc.health_listener).
"""

from __future__ import annotations

import logging

from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.checkpoints.redis_client import connect
from shared.checkpoints.store import CheckpointStore
from shared.rpc.health import HealthServicer
from shared.rpc.server import (
    GrpcService,
    MetricsEndpoint,
    configure_logging,
    enable_reflection,
    grpc_server,
    run_until_signalled,
)
from shared.rpc.stubs import tandem_trainer_pb2, tandem_trainer_pb2_grpc
from shared.security.access import AccessInterceptor
from shared.security.auth import UNRESTRICTED
from shared.security.tls import listen
from trainer_svc import metrics
from trainer_svc.config import TrainerConfig
from trainer_svc.datasets import DatasetCatalog
from trainer_svc.event_log import EventRelay, JobEventLog
from trainer_svc.events import EventHub
from trainer_svc.job_repository import JobRepository
from trainer_svc.manager import JobManager
from trainer_svc.pool import JobPool, connect_pool
from trainer_svc.redis_wait import RedisWait
from trainer_svc.request_validator import RequestValidator
from trainer_svc.servicer import TrainerServicer
from trainer_svc.training import JobRunner

log = logging.getLogger("tandem.trainer")
SERVICE = tandem_trainer_pb2.DESCRIPTOR.services_by_name["Trainer"]
SERVICE_NAME = SERVICE.full_name
HEALTH_SERVICES = ("", SERVICE_NAME)  # "" = the server as a whole
MAX_MESSAGE_BYTES = 8 * 2**20
PROBE_TIMEOUT = 2.0  # seconds a PING has, while the trainer waits for its Redis at start


class TrainerServer(GrpcService):
    def __init__(self, config: TrainerConfig):
        self.config = config
        client = connect(config.redis_url)
        pool_client = connect_pool(config.redis_url, config.lease_renew_ms / 1000)
        probe = connect(config.redis_url, retries=0, timeout=PROBE_TIMEOUT)  # RedisWait does the retrying
        self._redis_clients = (client, pool_client, probe)
        self.store = CheckpointStore(
            client, retention=config.checkpoint_retention, on_unreplicated=metrics.record_unreplicated
        )
        self.catalog = DatasetCatalog(
            client, config.data_dir, max_upload_bytes=config.max_upload_bytes, max_classes=config.max_classes
        )
        event_log = JobEventLog(client)
        self._relay = EventRelay(event_log)
        events = EventHub(relay=self._relay)
        self.manager = JobManager(
            JobRepository(client),
            RequestValidator(self.store, self.catalog, config.job_limits),
            JobRunner(self.store, self.catalog, events, outage_limit=config.publish_outage_seconds),
            events,
            JobPool(pool_client, lease_ms=config.lease_ms),
            event_log,
            max_concurrent_jobs=config.max_concurrent_jobs,
            max_restarts=config.max_restarts,
            resume_interrupted=config.resume_interrupted,
            outage_limit=config.publish_outage_seconds,
            lease_renew_seconds=config.lease_renew_ms / 1000,
            takeover_scan_seconds=config.takeover_scan_ms / 1000,
            queue_poll_seconds=config.queue_poll_ms / 1000,
        )
        self.redis_wait = RedisWait(probe, self.manager.start, self._ready)  # the work waits for Redis
        health = HealthServicer.for_workers(config.grpc_workers, "TRAINER_GRPC_WORKERS")
        for service in HEALTH_SERVICES:  # known from the first call on; SERVING once started
            health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        server = grpc_server(
            config.grpc_workers, MAX_MESSAGE_BYTES, interceptors=[AccessInterceptor(config.auth, "trainer")]
        )
        super().__init__(
            "trainer", server, health, config.grace_seconds, config.health_listen, "TRAINER_HEALTH_LISTEN"
        )
        tandem_trainer_pb2_grpc.add_TrainerServicer_to_server(
            TrainerServicer(self.manager, self.store, self.catalog, self.redis_wait), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        if config.auth.reflection_served:  # TANDEM_REFLECTION=off: not served
            enable_reflection(server, SERVICE)
        self.port = listen(server, config.listen, config.tls)
        self._job_states: metrics.JobStates | None = None

    def start(self) -> TrainerServer:
        """Serve (live, not yet ready), then start the work once Redis answers: now or later."""
        if self.config.metrics_port:
            self.metrics_http = MetricsEndpoint(self.config.metrics_port, self.config.metrics_address)
        self._serve()
        log.info(
            "event=trainer_started listen=%s port=%d metrics_port=%d health_port=%s",
            self.config.listen,
            self.port,
            self.config.metrics_port,
            self.health_listener.port if self.health_listener else "none",
        )
        self.redis_wait.begin()
        return self

    def _ready(self) -> None:
        """Once Redis has answered and the job manager has started: the trainer is ready."""
        if self.config.metrics_port:  # counted from the job records, which are in Redis
            self._job_states = metrics.register_job_states(
                lambda: (r.state.value for r in self.manager.list(UNRESTRICTED))
            )
        for service in HEALTH_SERVICES:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    def _drain(self, grace: float) -> None:
        """Take no new jobs; let running ones stop at a step boundary with a final checkpoint.

        A trainer still waiting for its Redis has no jobs: it stops waiting, and that is all."""
        if self.redis_wait.stop():
            self.manager.shutdown(grace)
        self._relay.close(timeout=2.0)  # the jobs' last events, for watchers on other trainers

    def _close(self) -> None:
        if self._job_states:
            metrics.unregister_job_states(self._job_states)
        for client in self._redis_clients:  # the jobs have stopped: nothing uses them any more
            client.close()


def main() -> None:
    configure_logging()
    try:
        server = TrainerServer(TrainerConfig())
    except ValueError as error:  # a setting that cannot work; the message names the variable
        log.error("event=trainer_misconfigured error=%s", error)
        raise SystemExit(1) from None
    run_until_signalled(server.start())
