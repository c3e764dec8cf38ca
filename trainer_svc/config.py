"""TrainerConfig: the trainer's settings, from environment variables with documented defaults (README).

The one set of settings a user gives the trainer: trainer_svc.server builds
every part from it, handing each part the fields it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.env import env
from shared.rpc.health_listener import check_own_port, listen_address, port_of
from shared.security.access import AccessSettings
from shared.security.tls import ServerTLS
from trainer_svc.limits import JobLimits


@dataclass(frozen=True)
class TrainerConfig:
    redis_url: str = field(default_factory=lambda: env("REDIS_URL", "redis://127.0.0.1:6379/0"))
    listen: str = field(default_factory=lambda: env("TRAINER_LISTEN", "127.0.0.1:50051"))
    data_dir: str | None = field(default_factory=lambda: env("TANDEM_DATA_DIR", None))
    max_concurrent_jobs: int = field(default_factory=lambda: env("TRAINER_MAX_CONCURRENT_JOBS", 1, int))
    grace_seconds: float = field(default_factory=lambda: env("TRAINER_GRACE_SECONDS", 30.0, float))
    metrics_port: int = field(default_factory=lambda: env("TRAINER_METRICS_PORT", 9101, int))
    metrics_address: str = field(default_factory=lambda: env("TRAINER_METRICS_ADDRESS", "127.0.0.1"))
    resume_interrupted: bool = field(default_factory=lambda: env("TRAINER_RESUME_INTERRUPTED", True, bool))
    max_restarts: int = field(default_factory=lambda: env("TRAINER_MAX_RESTARTS", 3, int))
    publish_outage_seconds: float = field(
        default_factory=lambda: env("TRAINER_PUBLISH_OUTAGE_SECONDS", 60.0, float)
    )
    checkpoint_retention: int = field(default_factory=lambda: env("TANDEM_CHECKPOINT_RETENTION", 5, int))
    max_upload_bytes: int = field(default_factory=lambda: env("TRAINER_MAX_UPLOAD_BYTES", 512 * 2**20, int))
    max_classes: int = field(default_factory=lambda: env("TRAINER_MAX_CLASSES", 10_000, int))
    grpc_workers: int = field(default_factory=lambda: env("TRAINER_GRPC_WORKERS", 32, int))
    # grpc.health.v1 alone, in plaintext, for probes that cannot do TLS (Kubernetes'); None = none.
    health_listen: str | None = field(
        default_factory=lambda: env("TRAINER_HEALTH_LISTEN", None, listen_address)
    )
    # The trainer pool (docs/trainer-pool.md): how long a job's lease lasts without renewal,
    # how often it is renewed, how often jobs nobody holds are looked for, how often a free
    # worker looks at the queue.
    lease_ms: int = field(default_factory=lambda: env("TRAINER_LEASE_MS", 10_000, int))
    lease_renew_ms: int = field(default_factory=lambda: env("TRAINER_LEASE_RENEW_MS", 3_000, int))
    takeover_scan_ms: int = field(default_factory=lambda: env("TRAINER_TAKEOVER_SCAN_MS", 3_000, int))
    queue_poll_ms: int = field(default_factory=lambda: env("TRAINER_QUEUE_POLL_MS", 100, int))
    # TLS (mutual with a client CA) from TANDEM_TLS_CERT/KEY/CLIENT_CA; None = plaintext.
    tls: ServerTLS | None = field(default_factory=ServerTLS.from_env)
    # Who may call what: TANDEM_TOKENS_FILE (unset = auth off) and TANDEM_REFLECTION (shared.security.access).
    auth: AccessSettings = field(default_factory=AccessSettings.from_env)
    # What one StartJob may ask for (TRAINER_MAX_SPEC_CHARACTERS ... TRAINER_MAX_STEPS).
    job_limits: JobLimits = field(default_factory=JobLimits.from_env)

    def __post_init__(self):
        if not 0 < self.lease_renew_ms * 2 <= self.lease_ms:
            raise ValueError(
                f"TRAINER_LEASE_RENEW_MS ({self.lease_renew_ms}) must be above 0 and at most half "
                f"of TRAINER_LEASE_MS ({self.lease_ms}): a lease must survive a missed renewal"
            )
        if self.takeover_scan_ms <= 0 or self.queue_poll_ms <= 0:
            raise ValueError("TRAINER_TAKEOVER_SCAN_MS and TRAINER_QUEUE_POLL_MS must be above 0")
        check_own_port(
            "TRAINER_HEALTH_LISTEN",
            self.health_listen,
            {"TRAINER_LISTEN": port_of(self.listen), "TRAINER_METRICS_PORT": self.metrics_port},
        )
