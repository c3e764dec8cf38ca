"""`make services`: the trainer and the inference service on this machine, in the foreground.

1. Redis: the one `--redis-url URL` or REDIS_URL names, else an embedded one
   (shared.embedded) that keeps its data in `.tandem/redis/` in the checkout
   (`--redis-dir`): the models trained survive a restart of `make services`,
   and a job that a Ctrl-C interrupted resumes at the next start. Delete the
   directory to start empty. It listens on a unix socket only: no port to
   collide with a Redis of the machine's own.
2. Check that every port the services are to listen on is free, and stop at
   once, with nothing started, naming the variable to change, if one is not.
3. Start `python -m trainer_svc` and `python -m infer_svc` (this interpreter)
   with this environment and that REDIS_URL: their settings are their own
   variables (README), with their own defaults (trainer 127.0.0.1:50051,
   metrics 9101; inference 127.0.0.1:50052, metrics 9102).
4. Print their output as it comes, each line prefixed with the service's
   name (`trainer | ...`), as docker compose does; once the trainer is ready
   and the inference service is live (it is ready once a model is
   published), a banner: the addresses and commands to try.
5. Ctrl-C or SIGTERM: SIGTERM to both services (the trainer checkpoints its
   running jobs), a wait bounded by their grace periods, then the embedded
   Redis, last; exit 0. A service that ends on its own stops the rest, and
   the launcher exits 1 saying which one and how.

The children never outlive the launcher: each is in a session of its own
(a Ctrl-C in the terminal reaches the launcher only, which stops them in
order, Redis last) and is stopped by the kernel if the launcher dies, even
by SIGKILL (shared.parent_death).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from functools import partial
from multiprocessing.connection import wait
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc

from infer_svc.config import InferConfig
from shared.checkpoints.redis_client import connect, describe, redis_url_from_env
from shared.client.connection import Connection, wait_until_serving
from shared.embedded.redis_server import EmbeddedRedisError, redis_for_local_use
from shared.parent_death import stop_when_parent_dies
from shared.rpc.health import LIVENESS
from shared.rpc.health_listener import port_of
from trainer_svc.config import TrainerConfig

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REDIS_DIR = REPO / ".tandem" / "redis"  # in .gitignore
READY_TIMEOUT = 120.0  # seconds the services have to serve (inference workers start interpreters)
STOP_MARGIN = 10.0  # seconds beyond a service's grace period before it is killed
PREFIX_WIDTH = len("trainer")


@dataclass(frozen=True)
class Service:
    """A service to run: `python -m module`, serving gRPC at `listen`, on the ports `ports` names."""

    name: str  # the prefix of its lines
    module: str
    listen: str  # HOST:PORT
    ready_when: str  # the health entry that must be SERVING for the banner
    grace_seconds: float
    ports: dict[str, str]  # the variable that sets it -> HOST:PORT, checked free before any start
    metrics: str  # the URL of its metrics, or "off"
    http: str = "off"  # the URL of its Open Inference Protocol over HTTP/REST (inference), or "off"


def planned_services() -> list[Service]:
    """The two services, as their settings (the environment) make them; ValueError for one that
    cannot work, naming the variable, as the services themselves would."""
    return [
        planned("trainer", "trainer_svc", TrainerConfig(), "TRAINER", ready_when=""),  # "": Redis reached
        # Ready only once a model is published: live is what can be waited for.
        planned_inference(InferConfig()),
    ]


def planned_inference(config: InferConfig) -> Service:
    """The inference service: as `planned` makes it, with its HTTP port (INFER_HTTP_LISTEN) too."""
    service = planned("infer", "infer_svc", config, "INFER", ready_when=LIVENESS)
    http = service_ports(("INFER_HTTP_LISTEN", config.http_listen))
    return replace(
        service,
        ports={**service.ports, **http},
        http=f"http://{config.http_listen}" if config.http_listen else "off",
    )


def planned(
    name: str, module: str, config: TrainerConfig | InferConfig, prefix: str, ready_when: str
) -> Service:
    """A service from its config, whose variables are PREFIX_LISTEN, PREFIX_METRICS_PORT, ..."""
    return Service(
        name,
        module,
        config.listen,
        ready_when,
        config.grace_seconds,
        service_ports(
            (f"{prefix}_LISTEN", config.listen),
            (f"{prefix}_METRICS_PORT", f"{config.metrics_address}:{config.metrics_port}"),
            (f"{prefix}_HEALTH_LISTEN", config.health_listen),
        ),
        metrics_url(config.metrics_address, config.metrics_port),
    )


def service_ports(*settings: tuple[str, str | None]) -> dict[str, str]:
    """The TCP addresses among `settings` (variable, HOST:PORT or None), to be checked free.

    A metrics port 0 is none; a gRPC address with port 0 (any free one) is refused: the
    launcher must know where to find the service."""
    ports = {}
    for variable, address in settings:
        port = port_of(address) if address else None
        if port == 0 and variable.endswith("_LISTEN"):
            raise ValueError(f"{variable}={address}: `make services` needs a port other than 0")
        if address and port:
            ports[variable] = address
    return ports


def metrics_url(address: str, port: int) -> str:
    return f"http://{address}:{port}/metrics" if port else "off"


def check_ports_free(services: list[Service]) -> None:
    """ValueError naming the port and its variable for the first address something listens on."""
    for service in services:
        for variable, address in service.ports.items():
            host, _, port = address.rpartition(":")
            family, kind, _, _, where = socket.getaddrinfo(
                host.strip("[]"), int(port), type=socket.SOCK_STREAM
            )[0]
            with socket.socket(family, kind) as probe:
                # As the servers bind: a port left in TIME_WAIT by a server just stopped is free.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(where)
                except OSError as error:
                    raise ValueError(
                        f"port {port} on {host} is taken ({error.strerror}): stop what listens "
                        f"there, or set {variable} to another"
                    ) from None


class Console:
    """This process's output, one whole line at a time, from any thread."""

    def __init__(self):
        self._lock = threading.Lock()

    def line(self, text: str, stream=sys.stdout) -> None:
        with self._lock:
            stream.write(text + "\n")
            stream.flush()

    def relay(self, name: str, output) -> None:
        """Each line of a child's `output` (bytes, till its end), prefixed with `name`."""
        for raw in output:
            self.line(f"{name:<{PREFIX_WIDTH}} | {raw.decode(errors='replace').rstrip()}")


class Running:
    """A service started as a child process, its output relayed to the console."""

    def __init__(self, service: Service, redis_url: str, console: Console):
        self.service = service
        self.process = subprocess.Popen(
            [sys.executable, "-m", service.module],
            cwd=REPO,
            env={**os.environ, "REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # The launcher's pid is taken here; the child, before its exec, only calls prctl (looked
            # up before the fork, shared.parent_death): safe while the relay threads run (PLW1509).
            preexec_fn=partial(stop_when_parent_dies, os.getpid()),  # noqa: PLW1509
        )
        self.ended = os.pidfd_open(self.process.pid)  # readable once the process has exited
        self._relay = threading.Thread(
            target=console.relay, args=(service.name, self.process.stdout), daemon=True
        )
        self._relay.start()

    def stop(self, console: Console) -> bool:
        """Wait for it to end (it has been sent SIGTERM), killing it after its grace period and a
        margin; True if it ended of itself with status 0."""
        try:
            code = self.process.wait(self.service.grace_seconds + STOP_MARGIN)
        except subprocess.TimeoutExpired:
            console.line(f"{self.service.name} did not stop in time; killing it", sys.stderr)
            os.killpg(self.process.pid, signal.SIGKILL)  # its own workers too: they are in its session
            code = self.process.wait()
        self._relay.join(timeout=5.0)  # its last lines
        os.close(self.ended)
        return code == 0


def stop_all(children: list[Running], console: Console) -> bool:
    """SIGTERM to every service, then wait for each (bounded); True if all ended cleanly."""
    for child in children:
        if child.process.poll() is None:
            child.process.send_signal(signal.SIGTERM)
    clean = [child.stop(console) for child in children]
    if not all(clean):
        console.line("a service did not stop cleanly (its lines above say why)", sys.stderr)
    return all(clean)


class Wakeups:
    """What the supervising loop waits for besides its children: SIGINT/SIGTERM, and readiness."""

    SIGNAL, READY, NOT_READY = "s", "r", "n"

    def __init__(self):
        self.reader, self._writer = socket.socketpair()
        self._writer.setblocking(False)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self.send(self.SIGNAL))

    def send(self, what: str) -> None:
        self._writer.send(what.encode())

    def received(self) -> str:
        """What was sent since the last call, in order."""
        return self.reader.recv(64).decode()


def tell_when_serving(children: list[Running], connection: Connection, wakeups: Wakeups) -> None:
    """Follow each service's health (shared.client) until it serves: then READY, or NOT_READY
    if they are not all serving within READY_TIMEOUT seconds."""
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        for child in children:
            with connection.channel(child.service.listen) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                wait_until_serving(health, child.service.ready_when, max(0.0, deadline - time.monotonic()))
    except grpc.RpcError:
        wakeups.send(Wakeups.NOT_READY)
        return
    wakeups.send(Wakeups.READY)


def supervise(children: list[Running], wakeups: Wakeups, console: Console, redis: str) -> int:
    """Until a signal (0) or a service's end (1); the banner once both serve."""
    connection = Connection.from_env()  # TLS and token as the CLI takes them, for a TLS deployment
    threading.Thread(target=tell_when_serving, args=(children, connection, wakeups), daemon=True).start()
    ended = {child.ended: child for child in children}
    while True:
        for ready in wait([*ended, wakeups.reader]):
            if ready in ended:
                child = ended[ready]
                console.line(
                    f"{child.service.name} exited with code {child.process.wait()}; stopping the rest",
                    sys.stderr,
                )
                return 1
            for what in wakeups.received():
                if what == Wakeups.SIGNAL:
                    console.line("stopping the services (Redis last)")
                    return 0
                if what == Wakeups.NOT_READY:
                    console.line(
                        f"the services did not all serve within {READY_TIMEOUT:.0f} s "
                        f"(their lines above say why); stopping them",
                        sys.stderr,
                    )
                    return 1
                console.line(banner(children, redis))


def banner(children: list[Running], redis: str) -> str:
    trainer, infer = (child.service for child in children)
    tandem = Path(sys.executable).parent / "tandem"
    if tandem.is_relative_to(Path.cwd()):
        tandem = tandem.relative_to(Path.cwd())
    rows = [
        "",
        "Tandem is up; Ctrl-C stops it all.",
        f"  trainer    {trainer.listen:<22} metrics {trainer.metrics}",
        f"  inference  {infer.listen:<22} metrics {infer.metrics}  (ready once a model is published)",
        f"             HTTP/REST {infer.http}",
        f"  Redis      {redis}",
        "Try:",
        f"  {tandem} jobs start --trainer {trainer.listen} --model-name digits --preset digits-cnn "
        "--dataset digits --follow",
        f"  {tandem} predict --server {infer.listen} --model-name digits --dataset digits --limit 5",
    ]
    if infer.http != "off":
        rows.append(f"  curl -s {infer.http}/v2/models/digits")
    if trainer.metrics != "off":
        rows.append(f"  curl -s {trainer.metrics} | grep ^tandem_")
    return "\n".join([*rows, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", help="use this Redis (default: $REDIS_URL, else an embedded one)")
    parser.add_argument(
        "--redis-dir",
        type=Path,
        default=DEFAULT_REDIS_DIR,
        help=f"where the embedded Redis keeps its data (default: {DEFAULT_REDIS_DIR})",
    )
    args = parser.parse_args(argv)
    console = Console()
    given_url = args.redis_url or redis_url_from_env()
    try:
        services = planned_services()
        check_ports_free(services)
        redis = (
            f"{describe(connect(given_url))} (--redis-url / REDIS_URL)"
            if given_url
            else f"embedded, its data in {args.redis_dir} (kept across restarts; delete it to start empty)"
        )
    except ValueError as error:
        console.line(f"make services: {error}", sys.stderr)
        return 1
    wakeups = Wakeups()  # from here on a signal is a stop, in order
    children: list[Running] = []
    status = 1  # unless supervise says otherwise
    try:
        with redis_for_local_use(given_url, data_dir=args.redis_dir, stop_with_owner=True) as redis_url:
            try:
                for service in services:
                    children.append(Running(service, redis_url, console))
                status = supervise(children, wakeups, console, redis)
            finally:
                status = status if stop_all(children, console) else 1  # then Redis, last
    except EmbeddedRedisError as error:
        console.line(f"make services: the embedded Redis did not start: {error}", sys.stderr)
        return 1
    console.line("stopped" if status == 0 else "stopped, after a failure")
    return status


if __name__ == "__main__":
    sys.exit(main())
