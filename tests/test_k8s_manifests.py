"""deploy/k8s, offline: every overlay renders (kubectl kustomize), validates strictly against
Kubernetes' schemas (kubernetes-validate, for 1.30 and the newest version it knows), and keeps
the invariants the README promises: probes, resources and a locked-down securityContext on
every container, the kubelet's gRPC probes on the services' health listeners, only
environment variables the services read, the Dockerfile's two images, a headless inference
Service.

No cluster is involved (none can run here): what a running cluster would do with the manifests
is not checked. Without kubectl the test is skipped, or fails under CI=true or
REQUIRE_KUBECTL=1. kubernetes-validate (and PyYAML with it) is in the dev lock.
"""

from __future__ import annotations

import ast
import copy
import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from infer_svc import server as infer_server
from shared.rpc.health import LIVENESS
from shared.rpc.health_listener import listen_address
from shared.security.deploy_secrets import SERVERS as CERTIFICATE_NAMES
from trainer_svc import server as trainer_server

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
OLDEST_VERSION = "1.30"
# Which source trees each service's container runs (the kubelet's gRPC probes run nothing in it).
SOURCES = {"trainer": ("trainer_svc", "shared"), "infer": ("infer_svc", "shared")}
# What the probes ask: the listener each service opens for them, and the health entries.
HEALTH_LISTEN = {"trainer": "TRAINER_HEALTH_LISTEN", "infer": "INFER_HEALTH_LISTEN"}
READY_SERVICE = {"trainer": trainer_server.SERVICE_NAME, "infer": infer_server.SERVICE_NAME}
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
STRICT = os.environ.get("REQUIRE_KUBECTL") == "1"


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found:
        return found
    reason = "kubectl is not on PATH: deploy/k8s cannot be rendered (kubectl kustomize)"
    if STRICT or os.environ.get("CI") == "true":
        pytest.fail(reason + " (CI=true or REQUIRE_KUBECTL=1)")
    pytest.skip(reason + "; CI=true or REQUIRE_KUBECTL=1 makes this a failure")


@functools.cache
def _render(overlay: str) -> tuple[dict, ...]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {overlay}: {done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def rendered(overlay: str) -> list[dict]:
    kubectl()  # skips or fails before the cached render
    return list(_render(overlay))


def of_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def containers(objects: list[dict]) -> Iterator[tuple[str, dict]]:
    """(workload/container, container) for every container and init container."""
    for o in objects:
        if o["kind"] in WORKLOADS:
            spec = o["spec"]["template"]["spec"]
            for c in (*spec.get("initContainers", ()), *spec["containers"]):
                yield f"{o['kind']}/{o['metadata']['name']}/{c['name']}", c


def pod_specs(objects: list[dict]) -> Iterator[tuple[str, dict]]:
    for o in objects:
        if o["kind"] in WORKLOADS:
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]


def service_container(objects: list[dict], service: str) -> dict:
    """The one container of the Deployment `service` (trainer, infer)."""
    (container,) = of_kind(objects, "Deployment")[service]["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", ())}


# ---------------------------------------------------------------- the schemas


@pytest.mark.parametrize("version", [OLDEST_VERSION, kubernetes_validate.latest_version()])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_validates_strictly(overlay, version):
    objects = rendered(overlay)
    assert objects, f"{overlay} renders nothing"
    failures = []
    for o in objects:
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as error:
            failures.append(f"{o['kind']}/{o['metadata']['name']}: {error}")
    assert not failures, "\n".join(failures)
    print(f"{overlay}: {len(objects)} objects valid (strict) for Kubernetes {version}")


def test_the_validation_is_strict_and_knows_both_versions():
    """What the test above relies on: an unknown field, or a known one misspelt, is refused."""
    versions = (OLDEST_VERSION, kubernetes_validate.latest_version())
    (trainer,) = [
        o for o in rendered("production") if o["kind"] == "Deployment" and o["metadata"]["name"] == "trainer"
    ]
    for version in versions:
        kubernetes_validate.validate(trainer, version, strict=True)
        for path in (("livenessProbe", "grpc", "servce"), ("resources", "limit")):
            broken = copy.deepcopy(trainer)
            target = broken["spec"]["template"]["spec"]["containers"][0]
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = "x"
            with pytest.raises(kubernetes_validate.ValidationError):
                kubernetes_validate.validate(broken, version, strict=True)


# ---------------------------------------------------------------- every container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_resources_and_a_locked_down_security_context(overlay):
    problems = []
    for name, c in containers(rendered(overlay)):
        for probe in ("livenessProbe", "readinessProbe"):
            if probe not in c:
                problems.append(f"{name}: no {probe}")
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in c.get("resources", {}).get(kind, {}):
                    problems.append(f"{name}: no {kind}.{resource}")
        context = c.get("securityContext", {})
        wanted = {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        problems += [
            f"{name}: securityContext.{key} is {context.get(key)!r}, not {value!r}"
            for key, value in wanted.items()
            if context.get(key) != value
        ]
    for name, spec in pod_specs(rendered(overlay)):
        # Service links would put TRAINER_PORT=tcp://..., INFER_PORT=... and the like in
        # the services' environment, beside the settings they read.
        if spec.get("enableServiceLinks") is not False:
            problems.append(f"{name}: enableServiceLinks is not false")
        if spec.get("securityContext", {}).get("runAsNonRoot") is not True:
            problems.append(f"{name}: the pod's securityContext lacks runAsNonRoot")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- settings the services read

ENV_READERS = {"env", "getenv", "get"}  # shared.env.env, os.getenv, os.environ.get


def _is_env_read(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id == "env"
    if isinstance(func, ast.Attribute) and func.attr in ENV_READERS:
        owner = func.value
        return (isinstance(owner, ast.Attribute) and owner.attr == "environ") or (
            isinstance(owner, ast.Name) and owner.id == "os" and func.attr == "getenv"
        )
    return False


def _strings_of(node: ast.AST | None) -> list[str] | None:
    """The str values of a literal str or a dict literal of str values; None if neither."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Dict):
        values = [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
        return values if len(values) == len(node.values) else None
    return None


class _EnvReads(ast.NodeVisitor):
    """The variable names a module reads, resolving a name given through a constant: a
    module-level str (DATA_DIR = "X"), a dict of them subscripted (NAMES[key]), a loop
    or comprehension variable over such a dict's .items() or .values(), or a name unpacked
    from a dict of tuples subscripted (variable, default = CHECKS[key]: its str members)."""

    def __init__(self, tree: ast.Module, where: str):
        self.where, self.names, self.unresolved = where, set[str](), list[str]()
        self.constants: dict[str, list[str]] = {}
        for node in ast.walk(tree):  # assignments anywhere: module constants and local dicts
            if isinstance(node, ast.Assign) and len(node.targets) == 1:
                target, values = node.targets[0], _strings_of(node.value)
                if isinstance(target, ast.Name) and values is not None:
                    self.constants[target.id] = values
        self.loop_vars: dict[str, list[str]] = {}
        tables = {
            node.targets[0].id: node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Dict)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.comprehension | ast.For):
                self._bind(node.target, node.iter)
            elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple):
                source = node.value
                if isinstance(source, ast.Subscript) and isinstance(source.value, ast.Name):
                    self._unpack(node.targets[0], tables.get(source.value.id))
        self.visit(tree)

    def _bind(self, target: ast.AST, iterable: ast.AST) -> None:
        if not (isinstance(iterable, ast.Call) and isinstance(iterable.func, ast.Attribute)):
            return
        source = iterable.func.value
        if not (isinstance(source, ast.Name) and source.id in self.constants):
            return
        if iterable.func.attr == "items" and isinstance(target, ast.Tuple) and len(target.elts) == 2:
            value = target.elts[1]
            if isinstance(value, ast.Name):
                self.loop_vars[value.id] = self.constants[source.id]
        elif iterable.func.attr == "values" and isinstance(target, ast.Name):
            self.loop_vars[target.id] = self.constants[source.id]

    def _unpack(self, target: ast.Tuple, table: ast.Dict | None) -> None:
        rows = [row for row in (table.values if table else ()) if isinstance(row, ast.Tuple)]
        for position, element in enumerate(target.elts):
            cells = [row.elts[position] for row in rows if len(row.elts) > position]
            found = [c.value for c in cells if isinstance(c, ast.Constant) and isinstance(c.value, str)]
            if isinstance(element, ast.Name) and found:
                self.loop_vars[element.id] = found

    def visit_Call(self, node: ast.Call) -> None:
        if _is_env_read(node) and node.args:
            self._read(node.args[0], node.lineno)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:  # os.environ["X"]
        if isinstance(node.value, ast.Attribute) and node.value.attr == "environ":
            self._read(node.slice, node.lineno)
        self.generic_visit(node)

    def _read(self, arg: ast.AST, line: int) -> None:
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            self.names.add(arg.value)
        elif isinstance(arg, ast.Name) and arg.id in self.loop_vars:
            self.names |= set(self.loop_vars[arg.id])
        elif isinstance(arg, ast.Name) and arg.id in self.constants:
            self.names |= set(self.constants[arg.id])
        elif (
            isinstance(arg, ast.Subscript)
            and isinstance(arg.value, ast.Name)
            and arg.value.id in self.constants
        ):
            self.names |= set(self.constants[arg.value.id])
        elif self.where == "shared/env.py" and isinstance(arg, ast.Name) and arg.id == "name":
            pass  # shared.env.env itself: os.environ.get(name), its callers are the reads
        else:
            self.unresolved.append(f"{self.where}:{line}: {ast.unparse(arg)}")


@functools.cache
def variables_read(service: str) -> frozenset[str]:
    names: set[str] = set()
    unresolved: list[str] = []
    for root in SOURCES[service]:
        path = REPO / root
        files = [path] if path.is_file() else sorted(path.rglob("*.py"))
        for file in files:
            if "stubs" in file.relative_to(REPO).parts:
                continue
            reads = _EnvReads(ast.parse(file.read_text(), str(file)), str(file.relative_to(REPO)))
            names |= reads.names
            unresolved += reads.unresolved
    # A read this scan cannot follow would let a manifest set a name nothing reads, unseen.
    assert not unresolved, "environment reads the scan cannot resolve:\n" + "\n".join(unresolved)
    return frozenset(names)


def test_the_scan_finds_the_settings_read_through_constants():
    trainer, infer = variables_read("trainer"), variables_read("infer")
    assert {"TRAINER_MAX_JOB_MEMORY_BYTES", "TANDEM_DATA_DIR", "REDIS_TLS_CA", "TRAINER_LEASE_MS"} <= trainer
    assert {"INFER_MODELS", "REDIS_PASSWORD_FILE", "TANDEM_TLS_CA", "TANDEM_TOKENS_FILE"} <= infer
    assert "TRAINER_LEASE_MS" not in infer and "INFER_MODELS" not in trainer


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_variable_set_on_the_services_is_one_they_read(overlay):
    deployments = of_kind(rendered(overlay), "Deployment")
    assert set(deployments) >= set(SOURCES)
    problems = []
    for service in SOURCES:
        for c in deployments[service]["spec"]["template"]["spec"]["containers"]:
            assert "envFrom" not in c, f"{service}: envFrom hides the names it sets"
            unknown = {e["name"] for e in c.get("env", ())} - variables_read(service)
            problems += [f"{service}/{c['name']}: {name} is read by nothing" for name in sorted(unknown)]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- images, services, probes


def dockerfile_images() -> set[str]:
    """tandem-<target> for each final target the Dockerfile builds (FROM runtime AS ...)."""
    targets = re.findall(r"^FROM\s+runtime\s+AS\s+(\S+)", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    return {f"tandem-{target}" for target in targets}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_images_are_the_two_the_dockerfile_builds_with_a_tag(overlay):
    assert dockerfile_images() == {"tandem-trainer", "tandem-infer"}
    used = {}
    for name, c in containers(rendered(overlay)):
        image, _, tag = c["image"].rpartition(":")
        assert image and tag and tag != "latest", f"{name}: {c['image']} has no pinned tag"
        used[name] = image.rsplit("/", 1)[-1]
    ours = {image for image in used.values() if image.startswith("tandem")}
    assert ours == dockerfile_images(), used
    assert used["Deployment/trainer/trainer"] == "tandem-trainer"
    assert used["Deployment/infer/infer"] == "tandem-infer"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inference_is_headless_autoscaled_and_both_services_have_disruption_budgets(overlay):
    objects = rendered(overlay)
    services = of_kind(objects, "Service")
    assert services["infer"]["spec"]["clusterIP"] == "None"  # clients balance HTTP/2 streams
    hpa = of_kind(objects, "HorizontalPodAutoscaler")["infer"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "infer"}
    budgets = of_kind(objects, "PodDisruptionBudget")
    assert budgets["trainer"]["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "trainer"}
    assert budgets["infer"]["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "infer"}
    assert all(o["metadata"].get("namespace") == "tandem" for o in objects if o["kind"] != "Namespace"), (
        "every object lives in the namespace tandem"
    )
    assert not of_kind(objects, "Secret"), "secret values are never committed: only referenced by name"


def test_the_overlays_size_the_trainer_pool():
    assert of_kind(rendered("dev"), "Deployment")["trainer"]["spec"]["replicas"] == 1
    assert of_kind(rendered("production"), "Deployment")["trainer"]["spec"]["replicas"] == 3
    assert of_kind(rendered("external-redis"), "Deployment")["trainer"]["spec"]["replicas"] == 3


FILE_SETTINGS = re.compile(r"_(FILE|CA|CERT|KEY)$")  # settings whose value is a file's path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_file_a_setting_names_is_in_a_mounted_secret(overlay):
    problems = []
    for name, spec in pod_specs(rendered(overlay)):
        secrets = {v["name"] for v in spec.get("volumes", ()) if "secret" in v}
        for c in spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", ())}
            for variable, path in env_of(c).items():
                if not FILE_SETTINGS.search(variable):
                    continue
                folder = str(Path(path).parent)
                if mounts.get(folder) not in secrets:
                    problems.append(
                        f"{name}/{c['name']}: {variable}={path}: no Secret is mounted at {folder}"
                    )
    assert not problems, "\n".join(problems)


def test_the_external_redis_overlay_runs_no_redis_and_points_both_services_at_one_tls_address():
    objects = rendered("external-redis")
    ours = ("redis", "sentinel")
    left = [
        f"{o['kind']}/{o['metadata']['name']}"
        for o in objects
        if o["metadata"].get("labels", {}).get("app.kubernetes.io/name") in ours
        or (o["kind"] == "NetworkPolicy" and o["metadata"]["name"] in ours)
    ]
    assert not left and not of_kind(objects, "StatefulSet"), left
    urls = set()
    for service in SOURCES:
        settings = env_of(service_container(objects, service))
        urls.add(settings["REDIS_URL"])
        assert settings["REDIS_TLS_CA"] == "/run/tandem/redis-ca/ca.crt"  # the provider's CA
        assert settings["REDIS_USERNAME"] == service  # the ACL users of shared.security.redis_acl
    (url,) = urls  # one Redis for both
    assert url.startswith("rediss://"), url  # TLS, no Sentinel
    assert env_of(service_container(objects, "trainer"))["REDIS_MIN_REPLICAS_ACK"] == "0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_services_probes_are_the_kubelets_grpc_probes_on_their_health_listener(overlay):
    objects = rendered(overlay)
    for service, setting in HEALTH_LISTEN.items():
        c = service_container(objects, service)
        listen = env_of(c).get(setting)
        assert listen, f"{service}: {setting} is not set: the probes would find no listener"
        host, _, port = listen_address(listen).rpartition(":")  # the service's own check of it
        assert host == "0.0.0.0", f"{service}: {setting}={listen}: the kubelet probes the pod's IP"
        wanted = {
            "startupProbe": LIVENESS,
            "livenessProbe": LIVENESS,  # SERVING with no model yet: a fresh cluster is not restarted
            "readinessProbe": READY_SERVICE[service],
        }
        for probe, health_service in wanted.items():
            assert set(c[probe]) & {"exec", "httpGet", "tcpSocket"} == set(), f"{service}: {probe}"
            assert c[probe]["grpc"] == {"port": int(port), "service": health_service}, f"{service}: {probe}"
        assert int(port) in {p["containerPort"] for p in c["ports"]}
        # Kept to the pod: no Service carries it, no NetworkPolicy opens it (the kubelet's
        # probes come from the node, which NetworkPolicies do not stop: deploy/k8s/README.md).
        service_ports = {p["port"] for p in of_kind(objects, "Service")[service]["spec"]["ports"]}
        assert int(port) not in service_ports
        opened = {
            p.get("port")
            for policy in of_kind(objects, "NetworkPolicy").values()
            for rule in policy["spec"].get("ingress", ())
            for p in rule.get("ports", ())
        }
        assert int(port) not in opened


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_are_announced(overlay):
    deployments = of_kind(rendered(overlay), "Deployment")
    ports = {"trainer": "9101", "infer": "9102"}
    for service, port in ports.items():
        template = deployments[service]["spec"]["template"]
        assert template["metadata"]["annotations"] == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": port,
            "prometheus.io/path": "/metrics",
        }
        (c,) = template["spec"]["containers"]
        assert int(port) in {p["containerPort"] for p in c["ports"]}


# ---------------------------------------------------------------- Redis's names


def redis_url_hosts(container: dict) -> set[str]:
    """The hosts of a rediss+sentinel://HOST:PORT,HOST:PORT/... REDIS_URL."""
    url = env_of(container)["REDIS_URL"]
    addresses = url.partition("://")[2].partition("/")[0].rpartition("@")[2]
    return {address.rpartition(":")[0] for address in addresses.split(",")}


def test_the_in_cluster_redis_names_are_the_ones_its_certificates_hold():
    """Pods, the Services that name them, what the Sentinels announce and what REDIS_URL
    lists are the names shared.security.deploy_secrets puts in the certificates (compose's)."""
    for overlay in [o for o in OVERLAYS if of_kind(rendered(o), "StatefulSet")]:
        objects = rendered(overlay)
        sentinels = of_kind(objects, "StatefulSet")["sentinel"]["spec"]
        start = sentinels.get("ordinals", {}).get("start", 0)
        pods = {f"sentinel-{n}" for n in range(start, start + sentinels["replicas"])}
        assert pods == set(CERTIFICATE_NAMES["sentinel"]), overlay
        (sentinel,) = sentinels["template"]["spec"]["containers"]
        assert "sentinel announce-ip $HOSTNAME\n" in sentinel["command"][-1]  # its pod name
        services = of_kind(objects, "Service")
        data_nodes = {"redis": "redis-0", "redis-replica": "redis-1"}
        assert set(data_nodes) == set(CERTIFICATE_NAMES["redis"])
        for name, pod in {**{p: p for p in pods}, **data_nodes}.items():
            assert services[name]["spec"]["selector"]["statefulset.kubernetes.io/pod-name"] == pod
            assert services[name]["spec"]["clusterIP"] == "None"
        for service in SOURCES:
            assert redis_url_hosts(service_container(objects, service)) == pods, (
                f"{overlay}: {service}'s REDIS_URL"
            )
