"""INFER_WORKERS: several inference server processes behind one port.

Why processes: a Predict spends most of its time in Python (protobuf, the
checks, the servicer), and a process runs Python on one core at a time
(the GIL), however many requests wait. So a replica runs N worker
processes, each an `InferenceServer` of its own (registry, version source,
batcher, gRPC server), all listening on the same port through
SO_REUSEPORT: the kernel hands each new connection to one of them, and a
connection stays with its worker. The same goes for the health port and the
HTTP/REST port (INFER_HEALTH_LISTEN, INFER_HTTP_LISTEN).

How, after grpc's multiprocessing example (examples/python/multiprocessing):

- The supervisor (this module, the process `python -m infer_svc` starts)
  never creates anything of gRPC. It reserves the ports first: a socket
  bound with SO_REUSEPORT and never listened on holds the port, so that
  "port 0" becomes one known port every worker binds, and no other
  program takes it in between.
- Workers are fresh interpreters (multiprocessing's spawn): they inherit
  no gRPC state, threads or locks, which a fork would copy half-made.
- Metrics: each worker writes its samples to files in a directory of the
  supervisor's (prometheus-client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR),
  and the supervisor serves /metrics, adding them up across workers.
- A worker that dies after it started is started again; one that fails to
  start stops the replica (exit 1), as a misconfigured server does. SIGTERM
  or SIGINT is passed on to every worker, which stops gracefully, and the
  supervisor exits once they all have.

What a client sees: health, readiness and answers of the worker its
connection went to; every worker loads every model, so a replica holds N
copies of each (README: INFER_WORKERS).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from dataclasses import replace
from multiprocessing.connection import Connection, wait

from prometheus_client import CollectorRegistry, multiprocess

from infer_svc.config import InferConfig
from infer_svc.malloc import keep_freed_memory_for_reuse
from infer_svc.server import InferenceServer
from shared.parent_death import stop_when_parent_dies
from shared.rpc.health_listener import bind_tcp
from shared.rpc.server import MetricsEndpoint, configure_logging, run_until_signalled

log = logging.getLogger("tandem.infer")
START_TIMEOUT = 120.0  # seconds a worker has to bind its ports and load the configured models
STOP_MARGIN = 10.0  # seconds beyond the grace period before a worker that has not stopped is killed


def reserve_port(address: str) -> tuple[socket.socket, str]:
    """Hold `address`'s port (HOST:PORT; port 0: a free one) with SO_REUSEPORT, so that the
    workers can all bind it and nothing else can; returns the socket and HOST:PORT bound."""
    try:
        holder = bind_tcp(address, reuse_port=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"cannot listen on {address!r}: {getattr(error, 'strerror', None) or error}"
        ) from None
    return holder, f"{address.rpartition(':')[0]}:{holder.getsockname()[1]}"


class Supervisor:
    """`config.worker_processes` workers serving `config` on shared ports, until a signal stops them."""

    def __init__(self, config: InferConfig):
        self.config, self.count = config, config.worker_processes
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, multiprocessing.process.BaseProcess] = {}  # index -> process
        self._stopping = False
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._metrics_dir = tempfile.TemporaryDirectory(prefix="tandem-infer-metrics-")

    def run(self) -> int:
        """Start the workers, keep them running until SIGTERM/SIGINT, stop them; the exit status."""
        holders, config = self._reserve_ports()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self._metrics_dir.name  # read by each worker's import
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        metrics_http = None
        try:
            # Bound before any worker starts: a port taken fails the start with nothing running.
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self._metrics_dir.name)
            metrics_http = MetricsEndpoint(self.config.metrics_port, self.config.metrics_address, registry)
            if not self._start(range(self.count), config):
                status = self._stop_all()
                return status if self._stopping else 1  # stopped while starting: not a failure
            log.info(
                "event=infer_workers_started workers=%d listen=%s metrics_port=%d",
                self.count,
                config.listen,
                self.config.metrics_port,
            )
            return self._watch(config)
        finally:
            if metrics_http:
                metrics_http.close()
            for holder in holders:
                holder.close()
            self._metrics_dir.cleanup()

    def _reserve_ports(self):
        """Sockets holding the ports, and the config with those ports filled in for port 0."""
        holder, listen = reserve_port(self.config.listen)
        holders = [holder]
        health_listen, http_listen = self.config.health_listen, self.config.http_listen
        if health_listen:
            health_holder, health_listen = reserve_port(health_listen)
            holders.append(health_holder)
        if http_listen:
            http_holder, http_listen = reserve_port(http_listen)
            holders.append(http_holder)
        return holders, replace(
            self.config, listen=listen, health_listen=health_listen, http_listen=http_listen, metrics_port=0
        )

    def _on_signal(self, signum, frame) -> None:
        self._stopping = True
        self._wake_writer.send(b"!")  # wakes _watch and _start, which wait on sockets and processes

    def _start(self, indexes, config) -> bool:
        """Start the workers `indexes` together and wait until each serves; False if one died
        or hung first (or a signal came)."""
        pipes = {index: self._spawn(index, config) for index in indexes}
        deadline = time.monotonic() + START_TIMEOUT
        for index, started in pipes.items():
            process = self._workers[index]
            ready = wait([started, process.sentinel, self._wake_reader], deadline - time.monotonic())
            try:
                if started in ready and started.recv():  # EOFError: it died before saying so
                    continue
            except EOFError:
                pass
            finally:
                started.close()
            if not self._stopping:
                log.error(
                    "event=infer_worker_failed_to_start worker=%d pid=%s exitcode=%s timeout=%.0fs",
                    index,
                    process.pid,
                    process.exitcode,
                    START_TIMEOUT,
                )
            return False
        return True

    def _spawn(self, index: int, config) -> Connection:
        """Start worker `index`; the end of the pipe on which it says it serves."""
        started, child_end = self._context.Pipe(duplex=False)
        # The worker reads its settings from the environment, as this process did, but for the
        # ports: nothing is pickled over to it but these strings.
        process = self._context.Process(
            target=run_worker,
            args=(index, config.listen, config.health_listen, config.http_listen, child_end),
            name=f"infer-worker-{index}",
        )
        process.start()
        child_end.close()
        self._workers[index] = process
        return started

    def _watch(self, config) -> int:
        """Restart workers that die until a signal comes; then stop them all. The exit status."""
        while not self._stopping:
            sentinels = {process.sentinel: index for index, process in self._workers.items()}
            for ready in wait([*sentinels, self._wake_reader]):
                if ready in sentinels and not self._stopping:
                    index = sentinels[ready]
                    died = self._workers[index]
                    died.join()
                    multiprocess.mark_process_dead(died.pid, self._metrics_dir.name)
                    log.error(
                        "event=infer_worker_died worker=%d pid=%d exitcode=%s; starting it again",
                        index,
                        died.pid,
                        died.exitcode,
                    )
                    if not self._start([index], config):
                        status = self._stop_all()
                        return status if self._stopping else 1
        return self._stop_all()

    def _stop_all(self) -> int:
        """SIGTERM every worker, wait for their graceful stops (killing any that overrun); 0 if all
        ended cleanly."""
        for process in self._workers.values():
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        status = 0
        for process in self._workers.values():
            process.join(self.config.grace_seconds + STOP_MARGIN)
            if process.is_alive():
                log.error("event=infer_worker_killed pid=%d: it did not stop in time", process.pid)
                process.kill()
                process.join()
            # A worker still starting when SIGTERM came ends by it, before it handles signals:
            # stopped as it was asked to, which is clean too.
            status = status or (0 if process.exitcode in (0, -signal.SIGTERM) else 1)
        log.info("event=infer_workers_stopped workers=%d", len(self._workers))
        return status


def run_worker(
    index: int, listen: str, health_listen: str | None, http_listen: str | None, started: Connection
) -> None:
    """A worker's life: an InferenceServer on the shared ports, until SIGTERM."""
    configure_logging()
    keep_freed_memory_for_reuse()
    stop_with_the_supervisor()
    config = replace(
        InferConfig(), listen=listen, health_listen=health_listen, http_listen=http_listen, metrics_port=0
    )
    server = InferenceServer(config, shares_ports=True).start()
    log.info("event=infer_worker_started worker=%d pid=%d", index, os.getpid())
    started.send(True)
    started.close()
    run_until_signalled(server)


def stop_with_the_supervisor() -> None:
    """Have the kernel send this worker SIGTERM when the supervisor dies, however it dies: an
    orphaned worker would go on holding the port (shared.parent_death)."""
    supervisor = multiprocessing.parent_process()
    stop_when_parent_dies(supervisor.pid if supervisor else None)
