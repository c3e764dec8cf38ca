"""TLS and mutual TLS on both gRPC servers and in every client we ship, with real certificates
made in the test (shared/security/certs.py) and real handshakes on 127.0.0.1.

The servers are the real trainer and inference services, in-process; the
clients are shared.client, the `tandem` CLI (as a subprocess), the images'
health check (as a subprocess) and tritonclient. A refused handshake shows
to a gRPC client as UNAVAILABLE: the checks below also look for the reason
in the message, so that an unrelated failure (nothing listening) cannot
pass for a refused certificate.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bench import security_speed
from bench.common import Timing
from infer_svc.server import InferenceServer
from shared.client import (
    BearerToken,
    Connection,
    InferenceClient,
    TrainerClient,
    read_token_file,
    token_from_env,
)
from shared.rpc.server import grpc_server
from shared.security.certs import CertificateAuthority, Issued
from shared.security.tls import ClientTLS, ServerTLS, is_loopback, listen
from tests.helpers import replace_file, wait_until
from tests.inference_harness import DEADLINE, NAME, infer_config, publish, samples
from tests.trainer_harness import trainer_config
from trainer_svc.server import TrainerServer

REPO = Path(__file__).resolve().parent.parent
CALL = 10.0  # seconds any one call may take
# A channel of its own for every connection attempt: grpc shares subchannels (connections)
# between channels with equal settings, and these tests are about new handshakes.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
TLS_VARIABLES = (
    "TANDEM_TLS_CERT",
    "TANDEM_TLS_KEY",
    "TANDEM_TLS_CLIENT_CA",
    "TANDEM_TLS_CA",
    "TANDEM_TLS_CLIENT_CERT",
    "TANDEM_TLS_CLIENT_KEY",
    "TANDEM_TLS",
    "TANDEM_TOKEN",
    "TANDEM_TOKEN_FILE",
)


@pytest.fixture(autouse=True)
def _no_tls_from_the_environment(monkeypatch):
    for variable in TLS_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


class Pki:
    """A CA with a server certificate for 127.0.0.1 and a client's; another CA with the same
    two; an expired server certificate; all written under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.ca = CertificateAuthority.new("tandem-test-ca")
        self.other_ca = CertificateAuthority.new("another-ca")
        self.ca_file = self.ca.write(root / "ca.pem")
        self.other_ca_file = self.other_ca.write(root / "other-ca.pem")
        self.server = self.write(self.ca.issue("server", hosts=("127.0.0.1", "localhost")), "server")
        self.client = self.write(self.ca.issue("alice", client=True), "alice")
        self.other_server = self.write(self.other_ca.issue("server", hosts=("127.0.0.1",)), "other-server")
        self.other_client = self.write(self.other_ca.issue("mallory", client=True), "mallory")
        self.expired = self.write(self.ca.issue("old", hosts=("127.0.0.1",), expired=True), "expired")

    def write(self, issued: Issued, stem: str) -> dict[str, Path]:
        return issued.write(self.root / stem)

    def server_tls(self, mutual: bool = False, pair: dict[str, Path] | None = None) -> ServerTLS:
        pair = pair or self.server
        return ServerTLS(pair["cert"], pair["key"], self.ca_file if mutual else None)

    def client_tls(self, ca: Path | None = None, pair: dict[str, Path] | None = None) -> ClientTLS:
        return ClientTLS(ca or self.ca_file, *((pair["cert"], pair["key"]) if pair else ()))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def start_trainer(redis_url, redis_client, tmp_path):
    """start_trainer(tls, **settings) -> a running TrainerServer's address; all stopped after."""
    started: list[TrainerServer] = []

    def start(tls: ServerTLS | None, **settings) -> str:
        config = trainer_config(redis_url, tmp_path / "data", tls=tls, **settings)
        started.append(TrainerServer(config).start())
        return f"127.0.0.1:{started[-1].port}"

    yield start
    for server in started:
        server.stop(grace=1)


@pytest.fixture
def start_inference(private_redis):
    """start_inference(tls) -> a running InferenceServer's address, serving NAME version 1."""
    started: list[InferenceServer] = []

    def start(tls: ServerTLS | None) -> str:
        started.append(InferenceServer(infer_config(private_redis.url, tls=tls)).start())
        return f"127.0.0.1:{started[-1].port}"

    yield start
    for server in started:
        server.stop(grace=0)


def health_status(address: str, tls: ClientTLS | None) -> int:
    """grpc.health.v1 Check of "" over a connection of its own; raises grpc.RpcError."""
    with Connection(tls).channel(address, OWN_CONNECTION) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL).status


def refused(address: str, tls: ClientTLS | None) -> str:
    """The message of the UNAVAILABLE a refused handshake gives (fails if the call answers)."""
    with pytest.raises(grpc.RpcError) as error:
        health_status(address, tls)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE, error.value
    return error.value.details()


# ---------------------------------------------------------------- TLS


def test_a_tls_trainer_answers_a_client_that_trusts_its_ca(pki, start_trainer):
    address = start_trainer(pki.server_tls())
    with TrainerClient(address, connection=Connection(pki.client_tls())) as client:
        client.wait_until_ready(DEADLINE)
        assert "digits" in [dataset.name for dataset in client.list_datasets()]
        assert client.list_jobs() == []


def test_a_plaintext_client_cannot_call_a_tls_server(pki, start_trainer):
    address = start_trainer(pki.server_tls())
    refused(address, None)
    assert health_status(address, pki.client_tls()) == health_pb2.HealthCheckResponse.SERVING


def test_a_client_that_trusts_another_ca_refuses_the_server(pki, start_trainer):
    address = start_trainer(pki.server_tls())
    assert "CERTIFICATE_VERIFY_FAILED" in refused(address, pki.client_tls(ca=pki.other_ca_file))


def test_an_expired_server_certificate_is_refused(pki, start_trainer):
    address = start_trainer(pki.server_tls(pair=pki.expired))
    assert "CERTIFICATE_VERIFY_FAILED" in refused(address, pki.client_tls())


# ---------------------------------------------------------------- mutual TLS


def test_mutual_tls_asks_for_a_client_certificate_signed_by_the_client_ca(pki, checkpoints, start_inference):
    publish(checkpoints, seed=0)
    address = start_inference(pki.server_tls(mutual=True))

    refused(address, pki.client_tls())  # no client certificate
    refused(address, pki.client_tls(pair=pki.other_client))  # signed by another CA
    refused(address, None)  # plaintext
    with InferenceClient(address, connection=Connection(pki.client_tls(pair=pki.client))) as client:
        client.wait_until_ready(DEADLINE)
        prediction = client.predict(NAME, samples(3))
    assert prediction.version == 1 and prediction.probabilities.shape == (3, 10)


def test_tritonclient_calls_the_inference_service_over_tls_and_mutual_tls(pki, checkpoints, start_inference):
    publish(checkpoints, seed=0)
    for mutual in (False, True):
        address = start_inference(pki.server_tls(mutual=mutual))
        client_pair = (
            {"private_key": str(pki.client["key"]), "certificate_chain": str(pki.client["cert"])}
            if mutual
            else {}
        )
        client = triton.InferenceServerClient(
            address, ssl=True, root_certificates=str(pki.ca_file), **client_pair
        )
        try:
            deadline = time.monotonic() + DEADLINE  # ready once version 1 is loaded
            while not client.is_server_ready(client_timeout=CALL):
                assert time.monotonic() < deadline, "the inference service never turned ready"
                time.sleep(0.01)
            inputs = triton.InferInput("input", [2, 1, 8, 8], "FP32")
            inputs.set_data_from_numpy(samples(2))
            result = client.infer(NAME, [inputs], client_timeout=CALL)
            assert result.as_numpy("probabilities").shape == (2, 10)
            np.testing.assert_allclose(result.as_numpy("probabilities").sum(axis=1), 1, rtol=1e-5)
        finally:
            client.close()
        if mutual:  # and without a client certificate, no answer
            bare = triton.InferenceServerClient(address, ssl=True, root_certificates=str(pki.ca_file))
            with pytest.raises(triton.InferenceServerException, match="UNAVAILABLE"):
                bare.is_server_ready(client_timeout=CALL)
            bare.close()


# ---------------------------------------------------------------- rotation


def answers(address: str, tls: ClientTLS) -> bool:
    try:
        return health_status(address, tls) == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def test_rotated_certificate_files_serve_new_connections_without_a_restart(
    pki, start_trainer, tmp_path, caplog
):
    live = pki.write(pki.ca.issue("server", hosts=("127.0.0.1",)), "live")  # the files rotated
    tls = ServerTLS(live["cert"], live["key"])
    address = start_trainer(tls)
    old_ca, new_ca_file = pki.client_tls(), tmp_path / "new-ca.pem"
    new_ca = CertificateAuthority.new("rotated-ca")
    new_ca.write(new_ca_file)
    rotated = new_ca.issue("server", hosts=("127.0.0.1",))
    with Connection(old_ca).channel(address) as opened_before:
        health = health_pb2_grpc.HealthStub(opened_before)
        health.Check(health_pb2.HealthCheckRequest(), timeout=CALL)

        # Half a rotation: the new certificate beside the old key does not load; the old
        # certificate keeps serving new connections, and the failure is logged.
        with caplog.at_level(logging.WARNING, logger="tandem.tls"):
            replace_file(live["cert"], rotated.cert_pem)
            assert answers(address, old_ca)
        assert "event=tls_reload_failed" in caplog.text

        replace_file(live["key"], rotated.key_pem)
        wait_until(lambda: answers(address, ClientTLS(new_ca_file)), "the rotated certificate")
        assert "CERTIFICATE_VERIFY_FAILED" in refused(address, old_ca)
        # A connection made before the rotation keeps the certificate it was made with.
        assert (
            health.Check(health_pb2.HealthCheckRequest(), timeout=CALL).status
            == health_pb2.HealthCheckResponse.SERVING
        )


# ---------------------------------------------------------------- settings and start


def test_server_settings_come_from_the_environment_and_bad_files_stop_the_start(pki, monkeypatch, tmp_path):
    assert ServerTLS.from_env() is None
    monkeypatch.setenv("TANDEM_TLS_CERT", str(pki.server["cert"]))
    monkeypatch.setenv("TANDEM_TLS_KEY", str(pki.server["key"]))
    monkeypatch.setenv("TANDEM_TLS_CLIENT_CA", str(pki.ca_file))
    assert ServerTLS.from_env() == ServerTLS(pki.server["cert"], pki.server["key"], pki.ca_file)

    monkeypatch.setenv("TANDEM_TLS_CLIENT_CA", str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match=r"TANDEM_TLS_CLIENT_CA=.*missing\.pem.*cannot read"):
        ServerTLS.from_env()
    monkeypatch.delenv("TANDEM_TLS_CLIENT_CA")
    monkeypatch.setenv("TANDEM_TLS_KEY", str(pki.client["key"]))  # another certificate's key
    with pytest.raises(ValueError, match="not a PEM certificate and its key"):
        tls = ServerTLS.from_env()
        assert tls is not None
        tls.credentials()  # as the server binds its port, at start
    monkeypatch.delenv("TANDEM_TLS_KEY")
    with pytest.raises(ValueError, match="TANDEM_TLS_CERT and TANDEM_TLS_KEY go together"):
        ServerTLS.from_env()


def test_a_service_with_a_missing_certificate_stops_at_start_naming_the_variable(tmp_path):
    missing = tmp_path / "server.crt"
    service = subprocess.run(
        [sys.executable, "-m", "trainer_svc"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            "TANDEM_TLS_CERT": str(missing),
            "TANDEM_TLS_KEY": str(missing),
            "TRAINER_LISTEN": "127.0.0.1:0",
            "TRAINER_METRICS_PORT": "0",
        },
        check=False,
    )
    assert service.returncode != 0
    assert f"TANDEM_TLS_CERT={str(missing)!r}: cannot read it" in service.stderr


@pytest.mark.parametrize(
    "address, loopback",
    [
        ("127.0.0.1:50051", True),
        ("127.1.2.3:0", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("[::ffff:127.0.0.1]:1", True),
        ("unix:/run/tandem.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.0.0.5:50051", False),
        ("trainer.example:50051", False),
    ],
)
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_plaintext_on_a_network_address_is_logged_loudly_and_loopback_is_not(caplog):
    for address, warned in (("127.0.0.1:0", False), ("0.0.0.0:0", True)):
        server = grpc_server(2, 1 << 20)
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tandem.tls"):
            port = listen(server, address, None)
        server.start()
        try:  # it serves (traffic to 127.0.0.1 only), warned or not
            assert health_status(f"127.0.0.1:{port}", None) == health_pb2.HealthCheckResponse.SERVING
        finally:
            server.stop(0)
        assert ("event=plaintext_on_network" in caplog.text) is warned, caplog.text


# ---------------------------------------------------------------- clients: settings, token


def test_client_settings_come_from_the_environment(pki, monkeypatch):
    assert Connection.from_env() == Connection(None, None)
    monkeypatch.setenv("TANDEM_TLS", "true")
    assert Connection.from_env().tls == ClientTLS()  # TLS with the system's roots
    monkeypatch.setenv("TANDEM_TLS_CA", str(pki.ca_file))
    monkeypatch.setenv("TANDEM_TLS_CLIENT_CERT", str(pki.client["cert"]))
    monkeypatch.setenv("TANDEM_TLS_CLIENT_KEY", str(pki.client["key"]))
    monkeypatch.setenv("TANDEM_TOKEN", "s3cret-token")
    connection = Connection.from_env()
    assert connection.tls == ClientTLS(pki.ca_file, pki.client["cert"], pki.client["key"])
    assert connection.token == "s3cret-token" and "s3cret" not in repr(connection)
    monkeypatch.delenv("TANDEM_TLS_CLIENT_KEY")
    with pytest.raises(ValueError, match="TANDEM_TLS_CLIENT_CERT and TANDEM_TLS_CLIENT_KEY"):
        Connection.from_env()


def test_token_files_are_read_and_never_echoed(tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("  tok-123\n")
    assert read_token_file(token_file) == "tok-123"
    monkeypatch.setenv("TANDEM_TOKEN_FILE", str(token_file))
    assert token_from_env() == "tok-123"
    monkeypatch.setenv("TANDEM_TOKEN", "tok-456")
    with pytest.raises(ValueError, match="not both"):
        token_from_env()
    token_file.write_text("two words secret\n")
    with pytest.raises(ValueError) as error:
        read_token_file(token_file)
    assert "secret" not in str(error.value)


class RecordingHealth(health_pb2_grpc.HealthServicer):
    """A health servicer that keeps each call's metadata, to see what a client sent."""

    def __init__(self):
        self.metadata: list[dict] = []

    def Check(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def Watch(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_the_token_travels_as_bearer_metadata_on_every_call(pki, tls):
    recorder = RecordingHealth()
    server = grpc_server(2, 1 << 20)
    health_pb2_grpc.add_HealthServicer_to_server(recorder, server)
    port = listen(server, "127.0.0.1:0", pki.server_tls() if tls else None)
    server.start()
    connection = Connection(pki.client_tls() if tls else None, token="tok-789")
    try:
        with TrainerClient(f"127.0.0.1:{port}", connection=connection) as client:
            client.wait_until_ready(DEADLINE)  # a stream
            health_pb2_grpc.HealthStub(client._channel).Check(  # a unary call
                health_pb2.HealthCheckRequest(), timeout=CALL
            )
    finally:
        server.stop(0)
    assert [m.get("authorization") for m in recorder.metadata] == ["Bearer tok-789"] * 2
    assert "tok-789" not in repr(BearerToken("tok-789"))


# ---------------------------------------------------------------- the CLI and the health check


def tandem(*argv, env: dict | None = None) -> subprocess.CompletedProcess:
    """`tandem ARGV` as a process of its own (flags and environment as a user would give them)."""
    return subprocess.run(
        [sys.executable, "-m", "shared.cli", *map(str, argv)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_tandem_jobs_list_over_tls_and_mutual_tls(pki, start_trainer):
    tls_address = start_trainer(pki.server_tls())
    listed = tandem("jobs", "list", "--trainer", tls_address, "--tls-ca", pki.ca_file)
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "no jobs\n", "")
    plaintext = tandem("jobs", "list", "--trainer", tls_address)
    assert plaintext.returncode == 2 and "UNAVAILABLE" in plaintext.stderr
    assert "--tls-ca" in plaintext.stderr  # the hint says what to try

    mutual_address = start_trainer(pki.server_tls(mutual=True))
    from_env = tandem(
        "jobs",
        "list",
        "--trainer",
        mutual_address,
        env={
            "TANDEM_TLS_CA": str(pki.ca_file),
            "TANDEM_TLS_CLIENT_CERT": str(pki.client["cert"]),
            "TANDEM_TLS_CLIENT_KEY": str(pki.client["key"]),
        },
    )
    assert (from_env.returncode, from_env.stdout) == (0, "no jobs\n"), from_env.stderr
    no_cert = tandem("jobs", "list", "--trainer", mutual_address, "--tls-ca", pki.ca_file)
    assert no_cert.returncode == 2 and "UNAVAILABLE" in no_cert.stderr


def test_tandem_predict_server_over_mutual_tls(pki, checkpoints, start_inference, tmp_path):
    publish(checkpoints, seed=0)
    address = start_inference(pki.server_tls(mutual=True))
    with InferenceClient(address, connection=Connection(pki.client_tls(pair=pki.client))) as client:
        client.wait_until_ready(DEADLINE)
    token_file = tmp_path / "token"
    token_file.write_text("tok-cli\n")  # sent, and unused: no auth on this server
    predicted = tandem(
        "predict",
        "--server",
        address,
        "--model-name",
        NAME,
        "--dataset",
        "digits",
        "--limit",
        "3",
        "--tls-ca",
        pki.ca_file,
        "--tls-cert",
        pki.client["cert"],
        "--tls-key",
        pki.client["key"],
        "--token-file",
        token_file,
    )
    assert predicted.returncode == 0, predicted.stderr
    assert f"answered by {NAME} version 1 at {address}" in predicted.stdout
    missing = tandem(
        "predict",
        "--server",
        address,
        "--model-name",
        NAME,
        "--dataset",
        "digits",
        "--tls-ca",
        tmp_path / "nope.pem",
    )
    assert missing.returncode == 2 and "the TLS CA=" in missing.stderr and "nope.pem" in missing.stderr
    help_text = " ".join(tandem("jobs", "list", "--help").stdout.split())
    assert "--token-file" in help_text and "never taken as an argument" in help_text


def healthcheck(service: str, listen_address: str, env: dict) -> subprocess.CompletedProcess:
    variable = {"trainer": "TRAINER_LISTEN", "infer": "INFER_LISTEN"}[service]
    return subprocess.run(
        [sys.executable, str(REPO / "docker" / "healthcheck.py"), service],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, variable: listen_address, **env},
        check=False,
    )


def test_the_health_check_speaks_tls_and_mutual_tls_as_its_service_does(pki, start_trainer):
    server_env = {
        "TANDEM_TLS_CERT": str(pki.server["cert"]),
        "TANDEM_TLS_KEY": str(pki.server["key"]),
        "TANDEM_TLS_CA": str(pki.ca_file),
    }
    address = start_trainer(pki.server_tls())
    checked = healthcheck("trainer", address, server_env)
    assert (checked.returncode, checked.stdout) == (0, f"{address}: SERVING\n"), checked.stderr
    plaintext = healthcheck("trainer", address, {})
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stdout

    mutual = start_trainer(pki.server_tls(mutual=True))
    mutual_env = {**server_env, "TANDEM_TLS_CLIENT_CA": str(pki.ca_file)}
    without = healthcheck("trainer", mutual, mutual_env)
    assert without.returncode == 1 and "TANDEM_TLS_CLIENT_CERT" in without.stdout
    with_cert = healthcheck(
        "trainer",
        mutual,
        {
            **mutual_env,
            "TANDEM_TLS_CLIENT_CERT": str(pki.client["cert"]),
            "TANDEM_TLS_CLIENT_KEY": str(pki.client["key"]),
        },
    )
    assert (with_cert.returncode, with_cert.stdout) == (0, f"{mutual}: SERVING\n"), with_cert.stderr


# ---------------------------------------------------------------- the benchmark


def test_the_tls_benchmark_times_every_transport(private_redis):
    tiny = Timing(rounds=1, block_seconds=0.01, warmup_calls=1)
    results = security_speed.measure(private_redis.url, tiny)
    assert [r["transport"] for r in results] == list(security_speed.transports())
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 for r in results)
    assert results[0]["p50_ratio"] == 1.0
