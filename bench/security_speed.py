"""The cost of security per request: a batch-1 Predict over plaintext, TLS and mutual TLS, and
with a bearer token checked by the access interceptor (shared.security.access), in one run.

One inference server per transport, all in this process, serving the same
digits CNN from one embedded Redis (or REDIS_URL); one client channel per
server, connected and warmed up before timing. So the per-request figures
are what a transport adds to a call on an open connection (encryption, the
token's metadata and its check), not the handshake; the handshake is the
second table: a new connection and its first call (a health check).

Each round times one block of every transport, in alternating order
(bench.common's interleaving), so a slowdown from another process on this
shared machine hits them alike; p50 and p99 are over every call of every
round, and each ratio is to plaintext's.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import replace
from functools import partial
from pathlib import Path
from tempfile import TemporaryDirectory

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import (
    Block,
    Contender,
    Timing,
    interleave,
    print_facts,
    print_table,
    quick_mode,
    redis_session,
    write_json,
)
from bench.serving_model import CALL_TIMEOUT, clients_block, published_model, request_for, server_config
from infer_svc.server import InferenceServer
from shared.client import Connection
from shared.rpc.stubs import tandem_inference_pb2_grpc
from shared.security.access import AccessSettings
from shared.security.auth import PREDICT, issue
from shared.security.certs import CertificateAuthority  # the repository's one certificate maker
from shared.security.tls import ClientTLS, ServerTLS

SETTINGS = {  # the full run takes about 40 s, the quick one about 10 s
    "full": Timing(rounds=7, block_seconds=0.8, warmup_calls=20),
    "quick": Timing(rounds=3, block_seconds=0.25, warmup_calls=5),
}


def transports() -> tuple[str, ...]:
    """The transports compared, plaintext (the baseline) first."""
    return ("plaintext", "TLS", "mutual TLS", "token (plaintext)", "TLS + token")


class Credentials:
    """A throwaway CA, a server certificate for 127.0.0.1, a client's, and a tokens file with one
    `predict` token, under `root`: each transport's server settings and client connection."""

    def __init__(self, root: Path):
        ca = CertificateAuthority.new("tandem-bench-ca")
        self.ca = ca.write(root / "ca.pem")
        self.server = ca.issue("bench-server", hosts=("127.0.0.1",)).write(root / "server")
        self.client = ca.issue("bench-client", client=True).write(root / "client")
        self.tokens_file = root / "tokens.json"
        self.token = issue(self.tokens_file, "bench", [PREDICT])

    def server_settings(self, transport: str) -> dict:
        """The InferConfig fields `tls` and `auth` of the transport's server."""
        mutual = transport == "mutual TLS"
        tls = (
            ServerTLS(self.server["cert"], self.server["key"], self.ca if mutual else None)
            if "TLS" in transport
            else None
        )
        tokens = str(self.tokens_file) if "token" in transport else None
        return {"tls": tls, "auth": AccessSettings(tokens_file=tokens)}

    def connection(self, transport: str) -> Connection:
        pair = (self.client["cert"], self.client["key"]) if transport == "mutual TLS" else ()
        return Connection(
            ClientTLS(self.ca, *pair) if "TLS" in transport else None,
            token=self.token if "token" in transport else None,
        )


def new_connection_block(address: str, connection: Connection, seconds: float) -> Block:
    """Open a new connection (a channel of its own), make one health check on it, close it; in
    a loop for about `seconds`."""
    request = health_pb2.HealthCheckRequest()
    latencies = []
    start = now = time.perf_counter()
    while now < start + seconds:
        with connection.channel(address, [("grpc.use_local_subchannel_pool", 1)]) as channel:
            health_pb2_grpc.HealthStub(channel).Check(request, timeout=CALL_TIMEOUT)
        latencies.append(time.perf_counter() - now)
        now = time.perf_counter()
    return Block(len(latencies), now - start, np.array(latencies))


def measure(redis_url: str, timing: Timing) -> list[dict]:
    """Per transport: batch-1 Predict p50/p99 on an open connection, and a new connection's
    first call, each with its ratio to plaintext's."""
    request = request_for(1)
    with published_model(redis_url), ExitStack() as stack:
        credentials = Credentials(Path(stack.enter_context(TemporaryDirectory())))
        calls, connects = [], []
        for transport in transports():
            config = replace(
                server_config(redis_url, batching=True), **credentials.server_settings(transport)
            )
            server = InferenceServer(config).start()
            stack.callback(server.stop, 0)
            address, connection = f"127.0.0.1:{server.port}", credentials.connection(transport)
            stub = tandem_inference_pb2_grpc.InferenceStub(stack.enter_context(connection.channel(address)))
            for _ in range(timing.warmup_calls):  # also waits out the model's first load
                stub.Predict(request, timeout=CALL_TIMEOUT, wait_for_ready=True)
            calls.append(Contender(transport, partial(clients_block, [stub], request, 1)))
            connects.append(Contender(transport, partial(new_connection_block, address, connection)))
        interleave(calls + connects, timing)
    base, base_connect = calls[0].summary(), connects[0].summary()
    results = []
    for call, connect in zip(calls, connects, strict=True):
        summary, connected = call.summary(), connect.summary()
        results.append(
            {
                "transport": call.name,
                "p50_ms": summary["p50_ms"],
                "p99_ms": summary["p99_ms"],
                "calls": summary["calls"],
                "p50_ratio": summary["p50_ms"] / base["p50_ms"],
                "p99_ratio": summary["p99_ms"] / base["p99_ms"],
                "connect_p50_ms": connected["p50_ms"],
                "connect_ratio": connected["p50_ms"] / base_connect["p50_ms"],
            }
        )
    return results


def run() -> None:
    timing = SETTINGS["quick" if quick_mode() else "full"]
    started = time.perf_counter()
    with redis_session() as (url, facts):
        facts["grpc"] = grpc.__version__
        facts["certificates"] = "EC P-256, made by shared/security/certs.py"
        facts["timing"] = (
            f"{timing.rounds} rounds of {timing.block_seconds} s blocks per "
            f"transport, interleaved; one client, one call at a time"
        )
        print_facts(
            "Security: the cost per request of TLS, mutual TLS and the token check "
            "(batch-1 Predict, digits CNN)",
            facts,
        )
        results = measure(url, timing)
    print_table(
        ["transport", "p50 ms", "p99 ms", "p50 x plaintext", "p99 x plaintext", "calls"],
        [
            [
                r["transport"],
                f"{r['p50_ms']:.3f}",
                f"{r['p99_ms']:.3f}",
                f"{r['p50_ratio']:.2f}",
                f"{r['p99_ratio']:.2f}",
                r["calls"],
            ]
            for r in results
        ],
    )
    print("A new connection and its first call (health Check), p50:")
    print_table(
        ["transport", "connect + call ms", "x plaintext"],
        [[r["transport"], f"{r['connect_p50_ms']:.2f}", f"{r['connect_ratio']:.2f}"] for r in results],
    )
    print(f"(took {time.perf_counter() - started:.0f} s)")
    print(f"wrote {write_json('security', {'facts': facts, 'results': results})}")
