"""The images' HEALTHCHECK: ask the service in this container its grpc.health.v1 status.

    python /opt/tandem/healthcheck.py trainer   # healthy = SERVING (tandem.v1.Trainer)
    python /opt/tandem/healthcheck.py infer     # healthy = the server answers (live)

The port comes from the service's own setting (TRAINER_LISTEN / INFER_LISTEN),
so a changed listen address needs no other change. The inference service is
ready (SERVING) only once a model version serves, and it starts with no
model; a fresh stack would never turn healthy if this check demanded
readiness, so for `infer` it asks liveness: any answer, SERVING or
NOT_SERVING, is healthy. Readiness stays visible through grpc.health.v1
itself (and `ServerReady` on the Open Inference Protocol). Exit 0 = healthy.

TLS: when the service serves TLS (TANDEM_TLS_CERT is set in the
container), so does the check, as any client would (shared.security.tls.ClientTLS,
from the client variables): it verifies the server against TANDEM_TLS_CA,
so the server's certificate must name 127.0.0.1 or localhost, where the
check connects. With mutual TLS (TANDEM_TLS_CLIENT_CA) the check needs a
client certificate of its own, TANDEM_TLS_CLIENT_CERT and _KEY (the service
itself never reads those): a server's certificate is usually issued for
serverAuth only, which a client may not present.
"""

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.security.tls import ClientTLS, channel

# service -> (listen variable, its default in the image, health service name, SERVING required)
CHECKS = {
    "trainer": ("TRAINER_LISTEN", "0.0.0.0:50051", "tandem.v1.Trainer", True),
    "infer": ("INFER_LISTEN", "0.0.0.0:50052", "", False),
}
TIMEOUT = 4.0


def target(listen: str) -> str:
    """ "0.0.0.0:50051" -> "127.0.0.1:50051": the listener as seen from inside the container."""
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::", "*"):
        host = "127.0.0.1"
    return f"{host}:{port}"


def client_tls() -> ClientTLS | None:
    """TLS as the service in this container serves it; None for plaintext."""
    if not os.environ.get("TANDEM_TLS_CERT"):
        return None
    if os.environ.get("TANDEM_TLS_CLIENT_CA") and not os.environ.get("TANDEM_TLS_CLIENT_CERT"):
        raise ValueError(
            "the service asks for client certificates (TANDEM_TLS_CLIENT_CA): give "
            "the health check one in TANDEM_TLS_CLIENT_CERT and TANDEM_TLS_CLIENT_KEY"
        )
    return ClientTLS.from_env() or ClientTLS()  # no TANDEM_TLS_CA: the system's roots


def main() -> int:
    if len(sys.argv) != 2 or sys.argv[1] not in CHECKS:
        print(f"usage: healthcheck.py {'|'.join(CHECKS)}", file=sys.stderr)
        return 2
    variable, default, service, require_serving = CHECKS[sys.argv[1]]
    address = target(os.environ.get(variable) or default)
    try:
        tls = client_tls()
    except ValueError as error:
        print(f"healthcheck: {error}")
        return 1
    with channel(address, tls) as health:
        try:
            status = (
                health_pb2_grpc.HealthStub(health)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
                .status
            )
        except grpc.RpcError as error:
            print(f"{address}: {error.code().name}: {error.details()}")
            return 1
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    print(f"{address}: {name}")
    if require_serving:
        return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
