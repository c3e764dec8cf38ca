"""The plaintext health listener for probes (TRAINER_HEALTH_LISTEN / INFER_HEALTH_LISTEN,
shared.rpc.health_listener), on the real servers with TLS and tokens on their main port.

A trainer and an inference server run in-process on 127.0.0.1, each with a
certificate made here and a tokens file, and a health listener on a port of
its own. On that port grpc.health.v1 answers in plaintext without a token,
with the main server's statuses ("liveness" SERVING once started; readiness
as on the main port), and every other method of every service is
UNIMPLEMENTED; the main port keeps TLS and tokens. It answers NOT_SERVING
from the start of a graceful stop and is closed when the stop ends. Bad
values stop the service at start with a message naming the setting.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from infer_svc.config import InferConfig
from infer_svc.server import InferenceServer
from shared.rpc import health_listener
from shared.rpc.health import LIVENESS
from shared.rpc.stubs import grpc_service_pb2, tandem_inference_pb2, tandem_trainer_pb2
from shared.security import auth
from shared.security.access import AccessSettings
from shared.security.certs import CertificateAuthority
from shared.security.tls import ClientTLS, ServerTLS, channel
from tests.helpers import wait_until
from tests.inference_harness import publish
from tests.trainer_harness import trainer_config
from trainer_svc.config import TrainerConfig
from trainer_svc.server import TrainerServer

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 10.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
# Every other service either server has: none of their methods may answer on the health port.
NOT_ON_THE_HEALTH_PORT = (
    tandem_trainer_pb2.DESCRIPTOR.services_by_name["Trainer"],
    tandem_inference_pb2.DESCRIPTOR.services_by_name["Inference"],
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
)
SETTINGS = ("TRAINER_HEALTH_LISTEN", "INFER_HEALTH_LISTEN", "TRAINER_LISTEN", "INFER_LISTEN")


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch):
    for variable in SETTINGS:
        monkeypatch.delenv(variable, raising=False)


class Secured:
    """A CA and a server certificate for 127.0.0.1, a tokens file and an admin's token, under `root`."""

    def __init__(self, root: Path):
        ca = CertificateAuthority.new()
        self.ca_file = ca.write(root / "ca.crt")
        pair = ca.issue("server", hosts=("127.0.0.1",)).write(root / "server")
        self.tls = ServerTLS(pair["cert"], pair["key"])
        tokens_file = root / "tokens.json"
        self.admin_token = auth.issue(tokens_file, "root", [auth.ADMIN])
        self.auth = AccessSettings(tokens_file=str(tokens_file))

    def main_channel(self, port: int) -> grpc.Channel:
        return channel(f"127.0.0.1:{port}", ClientTLS(self.ca_file))


@pytest.fixture(scope="module")
def secured(tmp_path_factory) -> Secured:
    return Secured(tmp_path_factory.mktemp("secured"))


@pytest.fixture
def trainer(secured, private_redis, tmp_path):
    config = trainer_config(
        private_redis.url, tmp_path / "data", tls=secured.tls, auth=secured.auth, health_listen="127.0.0.1:0"
    )
    server = TrainerServer(config).start()
    yield server
    server.stop(grace=1)


@pytest.fixture
def inference(secured, private_redis):
    config = InferConfig(
        redis_url=private_redis.url,
        listen="127.0.0.1:0",
        models=("digits",),
        poll_seconds=0.05,
        metrics_port=0,
        grpc_workers=16,
        tls=secured.tls,
        auth=secured.auth,
        health_listen="127.0.0.1:0",
    )
    server = InferenceServer(config).start()
    yield server
    server.stop(grace=0)


def check(target: grpc.Channel, service: str) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return health_pb2_grpc.HealthStub(target).Check(request, timeout=DEADLINE).status


def health_port(server) -> grpc.Channel:
    """A plaintext channel to `server`'s health listener."""
    return grpc.insecure_channel(f"127.0.0.1:{server.health_listener.port}")


def status_of_call(target: grpc.Channel, method_path: str, metadata=(), streaming=False) -> grpc.StatusCode:
    """How an empty request to `method_path` ends; a stream that answers is cancelled."""
    try:
        if streaming:
            stream = target.stream_stream(method_path)(iter([b""]), metadata=metadata, timeout=DEADLINE)
            next(stream, None)
            stream.cancel()
        else:
            target.unary_unary(method_path)(b"", metadata=metadata, timeout=DEADLINE)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def every_method_answers_unimplemented(target: grpc.Channel, token: str) -> dict[str, grpc.StatusCode]:
    """The methods of NOT_ON_THE_HEALTH_PORT that did not get UNIMPLEMENTED (with a token)."""
    answered = {}
    for service in NOT_ON_THE_HEALTH_PORT:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            streaming = method.client_streaming or method.server_streaming
            code = status_of_call(target, path, (("authorization", f"Bearer {token}"),), streaming)
            if code != grpc.StatusCode.UNIMPLEMENTED:
                answered[path] = code
    return answered


# ---------------------------------------------------------------- what each port serves


def test_the_trainers_health_port_serves_health_in_plaintext_and_nothing_else(trainer, secured):
    with health_port(trainer) as probe:
        assert check(probe, LIVENESS) == SERVING
        assert check(probe, "tandem.v1.Trainer") == SERVING
        assert check(probe, "") == SERVING
        assert every_method_answers_unimplemented(probe, secured.admin_token) == {}

    with secured.main_channel(trainer.port) as main:  # the main port: TLS, and a token but for health
        assert check(main, LIVENESS) == SERVING
        assert status_of_call(main, "/tandem.v1.Trainer/ListDatasets") == grpc.StatusCode.UNAUTHENTICATED
        bearer = (("authorization", f"Bearer {secured.admin_token}"),)
        assert status_of_call(main, "/tandem.v1.Trainer/ListDatasets", bearer) == grpc.StatusCode.OK
    with grpc.insecure_channel(f"127.0.0.1:{trainer.port}") as plaintext:
        with pytest.raises(grpc.RpcError) as refused:
            check(plaintext, LIVENESS)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_an_inference_server_with_no_model_yet_is_live_and_not_ready_then_ready(
    inference, secured, checkpoints
):
    with health_port(inference) as probe, secured.main_channel(inference.port) as main:
        for target in (probe, main):  # the same statuses on both ports
            assert check(target, LIVENESS) == SERVING  # the liveness probe's: a fresh cluster is live
            assert check(target, "tandem.v1.Inference") == NOT_SERVING  # the readiness probe's
            assert check(target, "") == NOT_SERVING
        assert every_method_answers_unimplemented(probe, secured.admin_token) == {}
        assert status_of_call(main, "/tandem.v1.Inference/ListModels") == grpc.StatusCode.UNAUTHENTICATED

        publish(checkpoints, seed=1)
        wait_until(lambda: check(probe, "tandem.v1.Inference") == SERVING, "readiness on the health port")
        assert check(probe, "digits") == SERVING
        assert check(main, "tandem.v1.Inference") == SERVING


def test_watches_on_the_health_port_have_places_of_their_own(trainer, secured):
    limit = health_listener.WORKERS // 4
    with health_port(trainer) as probe, secured.main_channel(trainer.port) as main:
        request = health_pb2.HealthCheckRequest(service=LIVENESS)
        watches = [health_pb2_grpc.HealthStub(probe).Watch(request, timeout=DEADLINE) for _ in range(limit)]
        try:
            assert [next(w).status for w in watches] == [SERVING] * limit
            refused = health_pb2_grpc.HealthStub(probe).Watch(request, timeout=DEADLINE)
            with pytest.raises(grpc.RpcError) as caught:
                next(refused)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert health_listener.WORKERS_SETTING in caught.value.details()
            assert check(probe, LIVENESS) == SERVING  # Checks still find a thread
            on_main = health_pb2_grpc.HealthStub(main).Watch(request, timeout=DEADLINE)
            assert next(on_main).status == SERVING  # and the main port's places are untouched
            on_main.cancel()
        finally:
            for watch in watches:
                watch.cancel()


def test_the_health_port_says_not_serving_from_the_start_of_a_stop_and_closes_with_it(
    secured, private_redis, tmp_path
):
    config = trainer_config(
        private_redis.url, tmp_path / "data", tls=secured.tls, health_listen="127.0.0.1:0"
    )
    server = TrainerServer(config).start()
    with health_port(server) as probe:
        watch = health_pb2_grpc.HealthStub(probe).Watch(
            health_pb2.HealthCheckRequest(service=LIVENESS), timeout=DEADLINE
        )
        assert next(watch).status == SERVING
        stopping = threading.Thread(target=server.stop, kwargs={"grace": 1})
        stopping.start()
        assert next(watch).status == NOT_SERVING  # sent by the stop, before the server closes
        stopping.join(timeout=DEADLINE)
        assert not stopping.is_alive()
    with health_port(server) as after, pytest.raises(grpc.RpcError) as closed:
        check(after, LIVENESS)
    assert closed.value.code() == grpc.StatusCode.UNAVAILABLE


def test_without_the_setting_there_is_no_health_listener(private_redis, tmp_path):
    server = TrainerServer(trainer_config(private_redis.url, tmp_path / "data")).start()
    try:
        assert server.health_listener is None
    finally:
        server.stop(grace=0)


# ---------------------------------------------------------------- bad values stop the service at start

CONFIGS = {"TRAINER_HEALTH_LISTEN": TrainerConfig, "INFER_HEALTH_LISTEN": InferConfig}


@pytest.mark.parametrize("setting", CONFIGS)
@pytest.mark.parametrize(
    "value", ["8086", "nonsense", "0.0.0.0:", ":8086", "0.0.0.0:99999", "0.0.0.0:80a", "::1:8086", "[nope]:1"]
)
def test_a_value_that_is_not_host_and_port_is_refused_naming_the_setting(monkeypatch, setting, value):
    monkeypatch.setenv(setting, value)
    with pytest.raises(ValueError, match=re.escape(f"{setting}={value!r}")):
        CONFIGS[setting]()


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"TRAINER_LISTEN": "0.0.0.0:50551", "TRAINER_HEALTH_LISTEN": "0.0.0.0:50551"}, "TRAINER_LISTEN"),
        ({"TRAINER_METRICS_PORT": "9555", "TRAINER_HEALTH_LISTEN": "127.0.0.1:9555"}, "TRAINER_METRICS_PORT"),
        ({"INFER_LISTEN": "0.0.0.0:50552", "INFER_HEALTH_LISTEN": "[::]:50552"}, "INFER_LISTEN"),
        ({"INFER_METRICS_PORT": "9556", "INFER_HEALTH_LISTEN": "0.0.0.0:9556"}, "INFER_METRICS_PORT"),
    ],
)
def test_a_port_the_service_uses_already_is_refused_naming_both_settings(monkeypatch, settings, named):
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    config = (
        TrainerConfig if "TRAINER_LISTEN" in settings or "TRAINER_METRICS_PORT" in settings else InferConfig
    )
    with pytest.raises(ValueError, match=rf"_HEALTH_LISTEN=.*is {named}'s too"):
        config()


def test_a_model_may_not_take_the_liveness_entry(monkeypatch):
    monkeypatch.setenv("INFER_MODELS", f"digits,{LIVENESS}")
    with pytest.raises(ValueError, match="INFER_MODELS"):
        InferConfig()


@contextmanager
def plain_socket():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@contextmanager
def grpc_server_with_reuseport():
    """Another gRPC server, bound as gRPC binds by default (SO_REUSEPORT): the port would be
    shared with it, silently, were the health listener to bind that way too."""
    other = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = other.add_insecure_port("127.0.0.1:0")
    try:
        yield port
    finally:
        other.stop(0)


@pytest.mark.parametrize("holder", [plain_socket, grpc_server_with_reuseport])
def test_a_port_taken_already_is_refused_naming_the_setting(private_redis, tmp_path, holder):
    with holder() as port:
        address = f"127.0.0.1:{port}"
        config = trainer_config(private_redis.url, tmp_path / "data", health_listen=address)
        with pytest.raises(ValueError, match=re.escape(f"TRAINER_HEALTH_LISTEN={address!r}: cannot listen")):
            TrainerServer(config)


@pytest.mark.parametrize(
    ("module", "setting"), [("trainer_svc", "TRAINER_HEALTH_LISTEN"), ("infer_svc", "INFER_HEALTH_LISTEN")]
)
def test_the_service_process_stops_at_start_on_a_bad_value(module, setting, tmp_path):
    env = {"PATH": "/usr/bin:/bin", setting: "0.0.0.0:99999", "TANDEM_DATA_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", module],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    # The trainer says it in one line (event=trainer_misconfigured), the inference service in a traceback.
    assert f"{setting}='0.0.0.0:99999': must be HOST:PORT" in done.stderr, done.stderr[-2000:]
