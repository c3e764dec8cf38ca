"""The inference service's settings, from environment variables with documented defaults (README)."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.checkpoints.checkpoint import check_model_name
from shared.env import env, usable_cores
from shared.rpc.health import LIVENESS
from shared.rpc.health_listener import check_own_port, listen_address, port_of
from shared.rpc.server import GRPC_MAX_MILLISECONDS
from shared.security.access import AccessSettings
from shared.security.tls import ServerTLS

MIN_CONNECTION_AGE_SECONDS, MAX_CONNECTION_AGE_SECONDS = 1.0, GRPC_MAX_MILLISECONDS // 1000
MAX_WORKERS = 256


def worker_count(raw: str) -> int:
    """ "4" -> 4: a number of worker processes, from 1 to MAX_WORKERS."""
    if not raw.strip().isdigit() or not 1 <= int(raw) <= MAX_WORKERS:
        raise ValueError(f"expected a number of worker processes from 1 to {MAX_WORKERS}")
    return int(raw)


def http_listen_address(raw: str) -> str | None:
    """ "127.0.0.1:8000" as given, once checked (listen_address); "off" -> None (no HTTP port)."""
    return None if raw.strip().lower() == "off" else listen_address(raw)


def model_list(raw: str) -> tuple[str, ...]:
    """ "digits,other" -> ("digits", "other")."""
    return tuple(check_model_name(name.strip()) for name in raw.split(",") if name.strip())


def version_pins(raw: str) -> dict[str, int]:
    """ "digits=3,other=7" -> {"digits": 3, "other": 7}."""
    pins = {}
    for pin in filter(None, (part.strip() for part in raw.split(","))):
        name, equals, version = pin.partition("=")
        if not equals or not version.strip().isdigit() or int(version) < 1:
            raise ValueError(f"{pin!r} is not MODEL=VERSION with a version of 1 or more")
        pins[check_model_name(name.strip())] = int(version)
    return pins


@dataclass(frozen=True)
class InferConfig:
    redis_url: str = field(default_factory=lambda: env("REDIS_URL", "redis://127.0.0.1:6379/0"))
    listen: str = field(default_factory=lambda: env("INFER_LISTEN", "127.0.0.1:50052"))
    # Loaded at start, and the only models served; empty = any model asked for, loaded on first use.
    models: tuple[str, ...] = field(default_factory=lambda: env("INFER_MODELS", (), model_list))
    # Models that serve one version rather than the latest.
    pinned: dict[str, int] = field(default_factory=lambda: env("INFER_PINNED", {}, version_pins))
    poll_seconds: float = field(default_factory=lambda: env("INFER_POLL_SECONDS", 2.0, float))
    batching: bool = field(default_factory=lambda: env("INFER_BATCHING", True, bool))
    max_batch_size: int = field(default_factory=lambda: env("INFER_MAX_BATCH_SIZE", 64, int))
    # 0, as Triton's dynamic batcher and TF Serving on CPUs default to: no request waits for
    # company; those that queue while a forward pass runs share the next one.
    max_queue_delay_ms: float = field(default_factory=lambda: env("INFER_MAX_QUEUE_DELAY_MS", 0.0, float))
    max_queue_rows: int = field(default_factory=lambda: env("INFER_MAX_QUEUE_ROWS", 4096, int))
    max_rows: int = field(default_factory=lambda: env("INFER_MAX_ROWS", 4096, int))  # per request
    max_message_bytes: int = field(default_factory=lambda: env("INFER_MAX_MESSAGE_BYTES", 16 * 2**20, int))
    grace_seconds: float = field(default_factory=lambda: env("INFER_GRACE_SECONDS", 10.0, float))
    # A connection older than this is closed (GOAWAY; its calls in flight get grace_seconds):
    # the client connects again and looks the service's name up anew, so that replicas added
    # since (a scale-out behind `dns:///`) get their share of the calls. 0 = never, gRPC's default.
    max_connection_age_seconds: float = field(
        default_factory=lambda: env("INFER_MAX_CONNECTION_AGE_SECONDS", 0.0, float)
    )
    metrics_port: int = field(default_factory=lambda: env("INFER_METRICS_PORT", 9102, int))  # 0 = off
    metrics_address: str = field(default_factory=lambda: env("INFER_METRICS_ADDRESS", "127.0.0.1"))
    grpc_workers: int = field(default_factory=lambda: env("INFER_GRPC_WORKERS", 32, int))
    # Server processes sharing the port (infer_svc.workers); None = one per usable core.
    workers: int | None = field(default_factory=lambda: env("INFER_WORKERS", None, worker_count))
    # grpc.health.v1 alone, in plaintext, for probes that cannot do TLS (Kubernetes'); None = none.
    health_listen: str | None = field(
        default_factory=lambda: env("INFER_HEALTH_LISTEN", None, listen_address)
    )
    # The Open Inference Protocol over HTTP/REST (infer_svc.http), beside gRPC as Triton serves
    # it (HTTP 8000, gRPC 8001): HOST:PORT, or "off" for none. Same TLS, tokens and metrics.
    http_listen: str | None = field(
        default_factory=lambda: env("INFER_HTTP_LISTEN", "127.0.0.1:8000", http_listen_address)
    )
    # TLS (mutual with a client CA) from TANDEM_TLS_CERT/KEY/CLIENT_CA; None = plaintext.
    tls: ServerTLS | None = field(default_factory=ServerTLS.from_env)
    # Who may call what: TANDEM_TOKENS_FILE (unset = auth off) and TANDEM_REFLECTION (shared.security.access).
    auth: AccessSettings = field(default_factory=AccessSettings.from_env)

    def __post_init__(self):
        age = self.max_connection_age_seconds
        if not (age == 0 or MIN_CONNECTION_AGE_SECONDS <= age <= MAX_CONNECTION_AGE_SECONDS):
            # Below a second, clients would spend their time reconnecting; above the maximum,
            # gRPC cannot take it (its option is a C int of milliseconds).
            raise ValueError(
                f"INFER_MAX_CONNECTION_AGE_SECONDS={age!r}: expected 0 (connections are never "
                f"closed for their age) or {MIN_CONNECTION_AGE_SECONDS:g} to "
                f"{MAX_CONNECTION_AGE_SECONDS} seconds"
            )
        if (self.workers or 1) > 1 and port_of(self.listen) is None:
            raise ValueError(
                f"INFER_WORKERS={self.workers}: worker processes share a TCP port, and "
                f"INFER_LISTEN={self.listen!r} has none; set INFER_WORKERS=1 or listen on HOST:PORT"
            )
        if LIVENESS in self.models:  # a model's health entry has its name: this one is taken
            raise ValueError(
                f"INFER_MODELS: {LIVENESS!r} is the process's own health entry; rename the model"
            )
        ports = {"INFER_LISTEN": port_of(self.listen), "INFER_METRICS_PORT": self.metrics_port}
        check_own_port("INFER_HEALTH_LISTEN", self.health_listen, ports)
        health_port = port_of(self.health_listen) if self.health_listen else None
        check_own_port("INFER_HTTP_LISTEN", self.http_listen, {**ports, "INFER_HEALTH_LISTEN": health_port})

    @property
    def worker_processes(self) -> int:
        """How many server processes to run: INFER_WORKERS, else one per usable core (one on a
        unix socket, which processes cannot share)."""
        if self.workers:
            return self.workers
        return usable_cores() if port_of(self.listen) is not None else 1
