"""What the two service processes (trainer, inference) run the same way: gRPC server, logging, SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from typing import Protocol

import grpc


class Service(Protocol):
    server: grpc.Server

    def stop(self, grace: float | None = None) -> None: ...

    def wait(self) -> None: ...


def grpc_server(workers: int, max_message_bytes: int) -> grpc.Server:
    """A gRPC server on `workers` threads; calls beyond 4 per thread are refused (RESOURCE_EXHAUSTED)."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        maximum_concurrent_rpcs=workers * 4,
        options=[("grpc.max_receive_message_length", max_message_bytes),
                 ("grpc.max_send_message_length", max_message_bytes)])


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")


def run_until_signalled(service: Service) -> None:
    """Serve a started service until SIGTERM or SIGINT, then stop it gracefully and return."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: threading.Thread(target=service.stop).start())
    service.wait()
    service.server.wait_for_termination()
