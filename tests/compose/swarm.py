"""The swarm stack under test: deploy/swarm/tandem-stack.yml on a single-node Swarm of the engine.

`SwarmStack` joins the engine to a Swarm of its own when it is in none (`docker swarm init
--advertise-addr 127.0.0.1`, left again at the end), makes the stack's secrets in a folder of
its own (shared.security.deploy_secrets), deploys the stack under a name of its own
(`tandem-swarm-test-<random>`), and starts a driver container on the stack's `clients`
network, from which tests/compose/swarm_client.py reaches the services by name (nothing is
published: see the stack file). `down` removes everything it made, whatever state it is in:
the driver, the stack (services, secrets, configs, networks), the stack's volumes, the images
the tests tagged, the secrets folder, and the Swarm if it made it; then it checks that nothing
with the stack's name is left.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from shared.security.deploy_secrets import make_secrets
from tests.compose.stack import REPO, Engine, Stack, StackError

STACK_FILE = REPO / "deploy" / "swarm" / "tandem-stack.yml"
CLIENT = ["python", "-m", "tests.compose.swarm_client"]  # run in /opt/tandem-tests, where tests/ is
STACK_LABEL = "com.docker.stack.namespace"
SERVICE_LABEL = "com.docker.swarm.service.name"
GATEWAY_NETWORK = "docker_gwbridge"  # what `swarm init` connects a node's containers to the outside by
# The services and their replicas (what `wait_converged` waits for at first).
REPLICAS = {
    "redis": 1,
    "redis-replica": 1,
    "sentinel-1": 1,
    "sentinel-2": 1,
    "sentinel-3": 1,
    "trainer": 3,
    "infer": 3,
}
SETTINGS = {
    "INFER_REPLICAS": str(REPLICAS["infer"]),
    "TRAINER_REPLICAS": str(REPLICAS["trainer"]),
    "HEALTHCHECK_INTERVAL": "2s",  # health reached quickly (each check is a Python process)
    "TANDEM_CHECKPOINT_RETENTION": "1000",
    "INFER_MAX_CONNECTION_AGE_SECONDS": "5",  # clients find new tasks within seconds
}

UPDATE_ENDED = ("completed", "paused", "rollback_completed", "rollback_paused")  # Swarm's final states

# Bounds, in seconds.
DEPLOY_TIMEOUT = 60  # `docker stack deploy` itself
CONVERGE_TIMEOUT = 180  # every task running and healthy
UPDATE_TIMEOUT = 300  # a rolling update of three tasks, each health-gated
REMOVE_TIMEOUT = 120


class SwarmStack(Stack):
    """deploy/swarm/tandem-stack.yml, deployed on a single-node Swarm; see the module docstring.

    A Stack for the compose tier's fixtures (up, wait_healthy, down, logs, timings), with its
    environment and secrets folder; the compose commands are not used.
    """

    def __init__(self, engine: Engine):
        super().__init__(
            engine, f"tandem-swarm-test-{secrets.token_hex(4)}", services=REPLICAS, settings=SETTINGS
        )
        self.made_swarm = False  # this stack ran `swarm init`: `down` leaves the Swarm
        self.made_gateway = False  # ... which made the docker_gwbridge network: `down` removes it
        self.tagged: list[str] = []  # images the tests tagged, removed by `down`
        self.driver = None
        self.driver_name = f"{self.project}-driver"

    # ------------------------------------------------------------ the Swarm

    def swarm_state(self) -> str:
        return self.docker.info()["Swarm"]["LocalNodeState"]

    def join_swarm(self) -> None:
        """A Swarm to deploy on: the engine's own if it is a manager, else one made here."""
        state = self.swarm_state()
        if state == "inactive":
            self.made_gateway = not self.docker.networks.list(names=[GATEWAY_NETWORK])
            self.run_docker("swarm", "init", "--advertise-addr", "127.0.0.1", timeout=60)
            self.made_swarm = True
        elif state != "active" or not self.docker.info()["Swarm"].get("ControlAvailable"):
            raise StackError(f"the engine is in a Swarm as {state!r}, not as a manager: cannot deploy")

    def run_docker(self, *args: str, timeout: float, check: bool = True) -> str:
        """A docker CLI command (Stack.run); its output."""
        return self.run(["docker", *args], timeout=timeout, check=check).stdout

    # ------------------------------------------------------------ up and down

    def up(self) -> None:
        started = time.monotonic()
        self.started = True
        self.join_swarm()
        make_secrets(self.secrets_dir, service_uid=10001, redis_gid=10002)
        self.run_docker(
            "stack",
            "deploy",
            "--resolve-image",
            "never",
            "-c",
            str(STACK_FILE),
            self.project,
            timeout=DEPLOY_TIMEOUT,
        )
        self.driver = self.docker.containers.run(
            self.env.get("TANDEM_TRAINER_IMAGE", "tandem-trainer:latest"),
            ["sleep", "infinity"],
            name=self.driver_name,
            detach=True,
            init=True,
            user="0:0",  # reads the host's tokens (root's files)
            working_dir="/opt/tandem-tests",  # where `python -m tests.compose.swarm_client` runs
            network=f"{self.project}_clients",
            labels={STACK_LABEL: self.project},
            environment={
                "TANDEM_TLS_CA": "/run/tandem/public/ca.crt",
                "TANDEM_TOKEN_FILE": "/run/tandem/clients/admin.token",
            },
            volumes={
                str(self.secrets_dir / "public"): {"bind": "/run/tandem/public", "mode": "ro"},
                str(self.secrets_dir / "clients"): {"bind": "/run/tandem/clients", "mode": "ro"},
                str(REPO / "tests"): {"bind": "/opt/tandem-tests/tests", "mode": "ro"},
            },
        )
        self.timings["deploy"] = time.monotonic() - started

    def wait_healthy(self, timeout: float = CONVERGE_TIMEOUT) -> None:
        started = time.monotonic()
        self.wait_converged(timeout)
        self.timings.setdefault(
            "deploy (healthy)", time.monotonic() - started + self.timings.get("deploy", 0)
        )

    def down(self) -> None:
        """Remove what the stack made, in an order that lets each removal succeed; then check.

        Safe at any point of `up` (an interrupted deploy included) and more than once.
        """
        if not self.started or self.removed:
            return
        started = time.monotonic()
        label = {"label": f"{STACK_LABEL}={self.project}"}
        if self.swarm_state() == "active":
            # `stack rm` removes the services, then fails on networks their stopping tasks still
            # use: those go below, once the tasks are gone.
            self.run_docker("stack", "rm", self.project, timeout=REMOVE_TIMEOUT, check=False)
        deadline = time.monotonic() + REMOVE_TIMEOUT  # a trainer task stops within 40 s
        while containers := self.docker.containers.list(all=True, ignore_removed=True, filters=label):
            # The driver is removed here, in the loop: a `run` that Ctrl-C interrupted may still
            # create it after the first look.
            for container in containers:
                if container.name == self.driver_name:
                    container.remove(force=True, v=True)  # v: the image's /data/datasets volume
            if time.monotonic() > deadline:
                raise StackError(
                    f"{self.project}: containers still there {REMOVE_TIMEOUT} s after `stack rm`"
                )
            time.sleep(0.5)
        if self.swarm_state() == "active":
            for kind in (self.docker.secrets, self.docker.configs):
                for item in kind.list(filters=label):
                    item.remove()
        for network in self.docker.networks.list(filters=label):
            network.remove()
        for volume in self.docker.volumes.list(filters=label):
            volume.remove(force=True)
        for image in self.tagged:
            if self.docker.images.list(name=image):
                self.docker.images.remove(image)
        if self.made_swarm:
            self.run_docker("swarm", "leave", "--force", timeout=60)
        if self.made_gateway:  # `swarm leave` keeps the bridge that `swarm init` made
            for network in self.docker.networks.list(names=[GATEWAY_NETWORK]):
                network.remove()
        shutil.rmtree(self.secrets_dir, ignore_errors=True)
        self.removed = True
        self.timings["remove"] = time.monotonic() - started
        if left := self.leftovers():
            raise StackError(f"{self.project}: left behind after removal: {left}")

    def leftovers(self) -> list[str]:
        """Whatever of the stack's is still there: services, secrets, configs, networks, ..."""
        label = {"label": f"{STACK_LABEL}={self.project}"}
        found = [
            f"container {c.name}"
            for c in self.docker.containers.list(all=True, ignore_removed=True, filters=label)
        ]
        found += [f"volume {v.name}" for v in self.docker.volumes.list(filters=label)]
        found += [f"network {n.name}" for n in self.docker.networks.list(filters=label)]
        found += [f"image {tag}" for tag in self.tagged if self.docker.images.list(name=tag)]
        if self.swarm_state() == "active":
            found += [f"service {s.name}" for s in self.docker.services.list(filters=label)]
            found += [f"secret {s.name}" for s in self.docker.secrets.list(filters=label)]
            found += [f"config {c.name}" for c in self.docker.configs.list(filters=label)]
        if self.made_swarm and self.swarm_state() != "inactive":
            found.append("the Swarm this stack made")
        if self.made_gateway and self.docker.networks.list(names=[GATEWAY_NETWORK]):
            found.append(f"network {GATEWAY_NETWORK}")
        return found

    def logs(self, tail: int = 150) -> str:
        parts = []
        for service in self.services:
            try:
                parts.append(
                    self.run_docker(
                        "service",
                        "logs",
                        "--no-trunc",
                        "--timestamps",
                        "--tail",
                        str(tail),
                        self.service_name(service),
                        timeout=30,
                    )
                )
            except (StackError, subprocess.TimeoutExpired) as error:
                parts.append(f"({service}: {error})")
        return "\n".join(parts)

    # ------------------------------------------------------------ services and tasks

    def service_name(self, service: str) -> str:
        return f"{self.project}_{service}"

    def tasks(self, service: str) -> list[dict]:
        """The service's tasks that Swarm wants running (its current ones), as the API gives them."""
        return self.docker.services.get(self.service_name(service)).tasks(
            filters={"desired-state": "running"}
        )

    def containers(self, service: str, all: bool = True) -> list:
        found = self.docker.containers.list(
            all=all, ignore_removed=True, filters={"label": f"{SERVICE_LABEL}={self.service_name(service)}"}
        )
        return sorted(found, key=lambda c: c.labels.get("com.docker.swarm.task.name", ""))

    def healthy_tasks(self, service: str) -> list[dict]:
        """The service's current tasks that run with a healthy container."""
        healthy = []
        for task in self.tasks(service):
            if task["Status"]["State"] == "running" and self._healthy(task):
                healthy.append(task)
        return healthy

    def _healthy(self, task: dict) -> bool:
        import docker  # the Docker SDK, imported where used: without it the tier is skipped, not broken

        container_id = task["Status"].get("ContainerStatus", {}).get("ContainerID")
        try:
            container = self.docker.containers.get(container_id) if container_id else None
        except docker.errors.NotFound:  # the task ended since it was listed
            return False
        return container is not None and container.attrs["State"].get("Health", {}).get("Status") == "healthy"

    def wait_converged(self, timeout: float = CONVERGE_TIMEOUT) -> None:
        """Until each service runs its replicas (`self.services`), all healthy, no update under way."""
        deadline = time.monotonic() + timeout
        while True:
            states = {}
            for service, replicas in self.services.items():
                healthy = len(self.healthy_tasks(service))
                update = self.docker.services.get(self.service_name(service)).attrs.get("UpdateStatus", {})
                if healthy != replicas or update.get("State") in ("updating", "rollback_started"):
                    states[service] = f"{healthy}/{replicas} healthy, update {update.get('State', 'none')}"
            if not states:
                return
            if time.monotonic() > deadline:
                raise StackError(f"{self.project}: not converged within {timeout} s: {states}")
            time.sleep(0.5)

    def scale(self, service: str, replicas: int) -> None:
        """`docker service scale`, returning once the replicas run healthy."""
        self.run_docker(
            "service", "scale", "--detach", f"{self.service_name(service)}={replicas}", timeout=60
        )
        self.services[service] = replicas
        self.wait_converged()

    def update_image(self, service: str, image: str) -> str:
        """A rolling update to `image` (update_config of the stack file), until it has ended; its
        final state: "completed", or "rollback_completed" when Swarm rolled it back."""
        name = self.service_name(service)
        previous = self.docker.services.get(name).attrs.get("UpdateStatus", {}).get("StartedAt")
        self.run_docker(
            "service", "update", "--detach", "--no-resolve-image", "--image", image, name, timeout=60
        )
        deadline = time.monotonic() + UPDATE_TIMEOUT
        while True:
            status = self.docker.services.get(name).attrs.get("UpdateStatus", {})
            if status.get("StartedAt") != previous and status.get("State") in UPDATE_ENDED:
                return status["State"]
            if time.monotonic() > deadline:
                raise StackError(
                    f"{name}: the update to {image} did not end within {UPDATE_TIMEOUT} s: {status}"
                )
            time.sleep(0.5)

    def tag_new_image(self, base: str, tag: str, *instructions: str) -> str:
        """A new image on top of `base` (a label, and `instructions` for its Dockerfile), as a
        release would be: its name."""
        name = f"{base.rpartition(':')[0] or base}:{tag}"
        dockerfile = "\n".join([f"FROM {base}", f"LABEL org.tandem.test.release={tag}", *instructions, ""])
        subprocess.run(
            ["docker", "build", "--quiet", "--tag", name, "-"],
            input=dockerfile,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        self.tagged.append(name)
        return name

    def task_addresses(self, service: str) -> set[str]:
        """The IP addresses of the service's healthy tasks on the `clients` network."""
        network = f"{self.project}_clients"
        addresses = set()
        for task in self.healthy_tasks(service):
            container = self.docker.containers.get(task["Status"]["ContainerStatus"]["ContainerID"])
            addresses.add(container.attrs["NetworkSettings"]["Networks"][network]["IPAddress"])
        return addresses

    # ------------------------------------------------------------ the client inside the stack

    def client(self, command: str, *args: str) -> Any:
        """A swarm_client.py command in the driver container; its JSON answer."""
        assert self.driver is not None, "the stack is not up"
        code, (out, err) = self.driver.exec_run([*CLIENT, command, *args], demux=True)
        out, err = (out or b"").decode(errors="replace"), (err or b"").decode(errors="replace")
        if code != 0:
            raise StackError(f"swarm_client.py {command} {' '.join(args)} failed ({code}):\n{err[-3000:]}")
        return json.loads(out.strip().splitlines()[-1])

    def stream(self, command: str, *args: str) -> ClientStream:
        assert self.driver is not None, "the stack is not up"
        return ClientStream(self.driver, command, *args)


class ClientStream:
    """A swarm_client.py stream (`loop`, `follow`): its JSON lines read as they come, in a thread.

    The command gets a stop file of its own as its first argument; `stop()` makes that file
    and waits for the command to exit, bounded.
    """

    def __init__(self, driver, command: str, *args: str):
        self.driver = driver
        self.stop_file = f"/tmp/stop-{secrets.token_hex(4)}"
        self.lines: list[dict] = []
        self.other_output: list[str] = []  # stderr: gRPC's own logging, a traceback
        self.ended = False
        self._condition = threading.Condition()
        argv = [*CLIENT, command, self.stop_file, *args]
        exec_id = driver.client.api.exec_create(driver.id, argv)
        self._output = driver.client.api.exec_start(exec_id, stream=True, demux=True)
        self._thread = threading.Thread(target=self._read, name=f"swarm-{command}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        pending = ""
        try:
            for out, err in self._output:
                if err:
                    self.other_output.append(err.decode(errors="replace"))
                if not out:
                    continue
                pending += out.decode(errors="replace")
                *complete, pending = pending.split("\n")
                with self._condition:
                    self.lines.extend(json.loads(line) for line in complete if line.strip())
                    self._condition.notify_all()
        finally:
            with self._condition:
                self.ended = True
                self._condition.notify_all()

    def wait_for(self, predicate: Callable[[dict], bool], what: str, timeout: float) -> dict:
        """The first line that satisfies `predicate`; StackError if the stream ends or time runs out."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                for line in self.lines:
                    if predicate(line):
                        return line
                remaining = deadline - time.monotonic()
                if self.ended or remaining <= 0:
                    output = "".join(self.other_output)[-2000:]
                    raise StackError(f"no {what} within {timeout} s (stream ended: {self.ended}) {output}")
                self._condition.wait(remaining)

    def snapshot(self) -> list[dict]:
        with self._condition:
            return list(self.lines)

    def stop(self, timeout: float = 30) -> None:
        self.driver.exec_run(["touch", self.stop_file])
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise StackError(f"the client stream did not end within {timeout} s of its stop file")
