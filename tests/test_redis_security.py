"""Redis over TLS and Redis ACL users, against real servers with real certificates.

TLS: Debian's redis-server (built with TLS; the embedded one is not), started
by each test on a free 127.0.0.1 port, TLS only, with certificates made here
(shared/security/certs.py). Without /usr/bin/redis-server these tests skip, saying so,
except in CI (CI=true), where they fail: `.ci/run` installs it.

ACL users: the ACL file shared.security.redis_acl writes, loaded by the embedded
redis-server (6.2); the real trainer and inference servers run with their
own users. A test-only `admin` user is added to the file to read Redis's
ACL LOG (every command Redis refused, with the user and the command).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import quote

import grpc
import numpy as np
import pytest
import redis

from shared.checkpoints.checkpoint import CheckpointMeta
from shared.checkpoints.redis_client import StoreUnavailable, connect, unavailable_on_error
from shared.checkpoints.store import CheckpointStore, ReplicationShortfall
from shared.embedded.redis_server import EmbeddedRedis, ServerTLS
from shared.rpc.stubs import tandem_trainer_pb2 as pb
from shared.security.certs import CertificateAuthority
from tests.helpers import wait_finished, wait_until
from tests.inference_harness import Inference, digits_model, infer_config, publish, samples
from tests.trainer_harness import Trainer, digits_arrays, mlp_job, rpc_error, trainer_config, upload

REPO = Path(__file__).resolve().parents[1]
TLS_REDIS_SERVER = Path("/usr/bin/redis-server")
ADMIN_PASSWORD = secrets.token_urlsafe(24)


# ---------------------------------------------------------------- certificates and servers


@pytest.fixture(scope="module")
def tls_redis_server() -> Path:
    """Debian's redis-server, which has TLS; skipped without it, except in CI."""
    if not TLS_REDIS_SERVER.is_file():
        reason = (
            f"Redis TLS tests need a redis-server built with TLS at {TLS_REDIS_SERVER} "
            f"(apt-get install redis-server; .ci/run installs it)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return TLS_REDIS_SERVER


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """PEM files: our CA, another CA, and certificates our CA signed for Redis and its clients."""
    root = tmp_path_factory.mktemp("pki")
    ca, other = CertificateAuthority.new("tandem-test-ca"), CertificateAuthority.new("someone-else-ca")
    files = {"ca": ca.write(root / "ca.pem"), "other-ca": other.write(root / "other-ca.pem")}
    issued = {
        "server": ca.issue("redis", hosts=("127.0.0.1", "localhost")),
        "expired-server": ca.issue("redis", hosts=("127.0.0.1", "localhost"), expired=True),
        "elsewhere-server": ca.issue("redis", hosts=("redis.internal",)),
        "client": ca.issue("trainer", client=True),
        "stranger-client": other.issue("trainer", client=True),
    }
    for name, certificate in issued.items():
        paths = certificate.write(root / name)
        files[f"{name}.crt"], files[f"{name}.key"] = paths["cert"], paths["key"]
    return files


@pytest.fixture
def start_tls_redis(tls_redis_server, pki):
    """start_tls_redis(certificate="server", auth_clients=False, **options) -> a running TLS Redis."""
    servers = []

    def start(certificate: str = "server", auth_clients: bool = False, **options) -> EmbeddedRedis:
        tls = ServerTLS(
            cert=pki[f"{certificate}.crt"],
            key=pki[f"{certificate}.key"],
            ca=pki["ca"],
            auth_clients=auth_clients,
        )
        servers.append(EmbeddedRedis(binary=tls_redis_server, tls=tls, **options).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def trust(monkeypatch, pki, ca: str = "ca", client: str | None = None) -> None:
    """The client settings: the CA to verify Redis with and, with `client`, our certificate."""
    monkeypatch.setenv("REDIS_TLS_CA", str(pki[ca]))
    if client:
        monkeypatch.setenv("REDIS_TLS_CERT", str(pki[f"{client}.crt"]))
        monkeypatch.setenv("REDIS_TLS_KEY", str(pki[f"{client}.key"]))


class CountingForwarder:
    """A TCP forwarder on 127.0.0.1 to a server's port that counts the connections made through it.

    Each attempt of a client is one connection; Redis itself counts none whose
    TLS handshake failed.
    """

    def __init__(self, port: int):
        self.port, self.connections = port, 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"rediss://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.port))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def forwarder():
    """forwarder(server) -> a CountingForwarder to it; closed after the test."""
    opened = []

    def open_(server: EmbeddedRedis) -> CountingForwarder:
        assert server.port is not None, "a forwarder needs a TCP server"
        opened.append(CountingForwarder(server.port))
        return opened[-1]

    yield open_
    for each in opened:
        each.close()


def refused(client: redis.Redis) -> StoreUnavailable:
    """The StoreUnavailable a PING through `client` ends in."""
    with pytest.raises(StoreUnavailable) as caught, unavailable_on_error(client):
        client.ping()
    return caught.value


# ---------------------------------------------------------------- TLS


def test_the_store_publishes_and_reads_over_tls(start_tls_redis, pki, monkeypatch):
    server = start_tls_redis()
    trust(monkeypatch, pki)
    assert server.url.startswith("rediss://127.0.0.1:")
    store = CheckpointStore(connect(server.url))
    version, model = publish(store, seed=3)
    loaded = store.latest("digits")
    assert loaded.meta.version == version == 1
    x = samples(4)
    np.testing.assert_array_equal(loaded.model.forward(x), model.forward(x))
    subscription = store.subscribe()
    publish(store, seed=4)
    assert wait_until(lambda: subscription.get_message(timeout=0.1), "an announcement over TLS")
    subscription.close()
    # The same name through a `localhost` address: the certificate names both.
    assert connect(server.url.replace("127.0.0.1", "localhost")).get("tandem:model:digits:latest") == b"2"


@pytest.mark.parametrize(
    "certificate, ca, words",
    [
        ("server", "other-ca", "unable to get local issuer certificate|self-signed certificate"),
        ("expired-server", "ca", "certificate has expired"),
        ("elsewhere-server", "ca", "IP address mismatch"),
    ],
    ids=["wrong-ca", "expired", "other-host"],
)
def test_a_server_certificate_that_does_not_verify_fails_at_once(
    start_tls_redis, forwarder, pki, monkeypatch, certificate, ca, words
):
    server = start_tls_redis(certificate)
    trust(monkeypatch, pki, ca)
    counted = forwarder(server)
    error = refused(connect(counted.url))  # 6 retries by default: none of them is used
    message = str(error)
    assert message.startswith(f"Redis at {counted.url}/0: its TLS certificate could not be verified (")
    assert re.search(words, message), message
    assert counted.connections == 1  # one attempt, no retry loop


def test_mutual_tls_needs_a_client_certificate_signed_by_the_ca_redis_trusts(
    start_tls_redis, forwarder, pki, monkeypatch
):
    server = start_tls_redis(auth_clients=True)
    trust(monkeypatch, pki)
    counted = forwarder(server)
    error = refused(connect(counted.url))
    assert str(error).startswith(f"Redis at {counted.url}/0: the TLS handshake failed (")
    assert "CERTIFICATE_REQUIRED" in str(error) and "REDIS_TLS_CERT" in str(error)
    assert counted.connections == 1

    trust(monkeypatch, pki, client="stranger-client")
    assert "the TLS handshake failed" in str(refused(connect(server.url)))

    trust(monkeypatch, pki, client="client")
    client = connect(server.url)
    assert client.set("tandem:probe", b"over mutual TLS") and client.get("tandem:probe") == b"over mutual TLS"


def test_a_plaintext_client_gets_nothing_from_the_tls_port(start_tls_redis):
    server = start_tls_redis()
    plaintext = connect(server.url.replace("rediss://", "redis://"), retries=1)
    error = refused(plaintext)
    assert str(error).startswith(f"Redis at redis://127.0.0.1:{server.port}/0 unavailable after 2 attempts: ")
    assert redis.Redis.from_url(server.socket_url).dbsize() == 0


# ---------------------------------------------------------------- ACL users


@pytest.fixture
def acl_passwords(tmp_path) -> dict[str, str]:
    """A password file for each service user (as Docker secrets give them), and the ACL file from them."""
    passwords = {"trainer": secrets.token_urlsafe(24), "infer": secrets.token_urlsafe(24)}
    for user, password in passwords.items():
        (tmp_path / f"{user}.password").write_text(password + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.security.redis_acl",
            "--trainer-password-file",
            str(tmp_path / "trainer.password"),
            "--infer-password-file",
            str(tmp_path / "infer.password"),
            "--out",
            str(tmp_path / "users.acl"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
        cwd=REPO,
    )
    with open(tmp_path / "users.acl", "a") as acl:  # the test's own, to read the ACL LOG
        acl.write(f"user admin on >{ADMIN_PASSWORD} ~* &* +@all\n")
    return passwords


@pytest.fixture
def acl_redis(acl_passwords, tmp_path):
    with EmbeddedRedis(tcp=True, aclfile=tmp_path / "users.acl") as server:
        yield server


def as_user(server: EmbeddedRedis, user: str, password: str) -> str:
    """The server's URL with an ACL user and its password."""
    return server.url.replace("://", f"://{user}:{quote(password, safe='')}@", 1)


def admin(server: EmbeddedRedis) -> redis.Redis:
    return connect(as_user(server, "admin", ADMIN_PASSWORD))


def denied(server: EmbeddedRedis) -> list[dict]:
    """Redis's ACL LOG: each command it refused (user, reason, object), newest first."""
    return admin(server).acl_log()


def test_the_ACL_file_lets_no_one_in_without_a_user_and_password(acl_redis):
    with (
        pytest.raises(StoreUnavailable, match="refused the credentials"),
        unavailable_on_error(client := connect(acl_redis.url)),
    ):
        client.ping()
    with (
        pytest.raises(StoreUnavailable, match="refused the credentials"),
        unavailable_on_error(client := connect(as_user(acl_redis, "infer", "guessed"))),
    ):
        client.ping()


def test_trainer_and_inference_run_with_their_own_users_and_no_command_is_refused(
    acl_redis, acl_passwords, tmp_path
):
    trainer = Trainer(
        acl_redis,
        trainer_config(
            as_user(acl_redis, "trainer", acl_passwords["trainer"]), tmp_path / "data", checkpoint_retention=1
        ),
    )
    inference = Inference(infer_config(as_user(acl_redis, "infer", acl_passwords["infer"])))
    try:
        trainer.stub.UploadDataset(upload("small-digits", digits_arrays(200, 50)), timeout=30)
        assert "small-digits" in {
            d.name for d in trainer.stub.ListDatasets(pb.ListDatasetsRequest()).datasets
        }
        request = mlp_job(
            "digits", epochs=3, dataset="small-digits", every_epoch=True, request_id="acl-run-1"
        )
        job = trainer.stub.StartJob(request)
        assert trainer.stub.StartJob(request).job_id == job.job_id  # the idempotency script ran
        done = wait_finished(trainer.stub, job.job_id)
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
        assert [j.job_id for j in trainer.stub.ListJobs(pb.ListJobsRequest()).jobs] == [job.job_id]
        newest = done.last_published_version
        assert newest >= 2  # the publisher may skip to the newest of those waiting
        listed = trainer.stub.ListCheckpoints(pb.ListCheckpointsRequest(model_name="digits")).checkpoints
        assert [c.version for c in listed] == [newest]  # retention 1 deleted the others
        wait_until(lambda: inference.served_version() == newest, "inference to serve the newest version")
        warm_start = mlp_job("nothing-here")
        warm_start.resume_from_version = 7
        assert rpc_error(trainer.stub.StartJob, warm_start).code() == grpc.StatusCode.NOT_FOUND
        assert inference.predict(samples(3)).probabilities.shape == [3, 10]
    finally:
        inference.close()
        trainer.close()
    assert denied(acl_redis) == []


@pytest.fixture
def published(acl_redis, acl_passwords) -> tuple[CheckpointStore, bytes]:
    """A checkpoint the trainer user published, and its bytes as stored."""
    store = CheckpointStore(connect(as_user(acl_redis, "trainer", acl_passwords["trainer"])))
    version, _ = publish(store, seed=1)
    return store, store.get_blob("digits", version)


def test_the_trainer_user_may_wait_for_replicas(acl_redis, acl_passwords, caplog):
    """REDIS_MIN_REPLICAS_ACK: the trainer's publish sends WAIT, which its ACL allows.

    This Redis has no replica, so WAIT answers 0 at its timeout: the publish is reported
    unreplicated, not refused (a refusal is logged as replica_wait_refused).
    """
    shortfalls: list[ReplicationShortfall] = []
    store = CheckpointStore(
        connect(as_user(acl_redis, "trainer", acl_passwords["trainer"])),
        min_replicas_ack=1,
        replica_ack_timeout_ms=50,
        on_unreplicated=shortfalls.append,
    )
    version, _ = publish(store, seed=2)
    assert shortfalls == [ReplicationShortfall("digits", version, acked=0, wanted=1)]
    assert "replica_wait_refused" not in caplog.text


LEAKED_INFER_ATTEMPTS = [
    ("overwrite the checkpoint", ("SET", "tandem:model:digits:v:1:blob", b"evil"), "set"),
    ("move latest", ("SET", "tandem:model:digits:latest", "99"), "set"),
    ("delete the checkpoint", ("DEL", "tandem:model:digits:v:1:blob"), "del"),
    ("rewrite its metadata", ("HSET", "tandem:model:digits:versions", "1", "{}"), "hset"),
    (
        "announce a version",
        ("PUBLISH", "tandem:announcements", '{"model_name":"digits","version":9}'),
        "publish",
    ),
    ("append to the stream", ("XADD", "tandem:announcements", "*", "announcement", "{}"), "xadd"),
    ("write a job", ("SET", "tandem:job:0123456789abcdef", "{}"), "set"),
    ("read a job", ("GET", "tandem:job:0123456789abcdef"), "tandem:job:0123456789abcdef"),
    ("run a script", ("EVAL", "return redis.call('DEL', KEYS[1])", 1, "tandem:models"), "eval"),
    ("flush everything", ("FLUSHALL",), "flushall"),
    ("reconfigure Redis", ("CONFIG", "SET", "appendonly", "yes"), "config"),
    ("grant itself more", ("ACL", "SETUSER", "infer", "+@all"), "acl"),
]


@pytest.mark.parametrize(
    "attempt, command, object_", LEAKED_INFER_ATTEMPTS, ids=[attempt for attempt, *_ in LEAKED_INFER_ATTEMPTS]
)
def test_leaked_inference_credentials_cannot_change_the_store(
    acl_redis, acl_passwords, published, attempt, command, object_
):
    store, blob = published
    leaked = connect(as_user(acl_redis, "infer", acl_passwords["infer"]))
    with pytest.raises(redis.exceptions.NoPermissionError) as refusal:
        leaked.execute_command(*command)
    assert "no permissions" in str(refusal.value)
    (entry,) = denied(acl_redis)
    assert (entry["username"], entry["object"]) == ("infer", object_)
    assert store.get_blob("digits", 1) == blob and store.latest_version("digits") == 1
    assert CheckpointStore(leaked).get_blob("digits", 1) == blob  # reading is what it may do


def test_a_refused_command_is_a_store_unavailable_naming_the_user_and_is_not_retried(
    acl_redis, acl_passwords, published
):
    _, blob = published
    leaked = CheckpointStore(connect(as_user(acl_redis, "infer", acl_passwords["infer"])))
    model = digits_model(seed=2)
    with pytest.raises(StoreUnavailable) as refusal:
        leaked.publish(model, CheckpointMeta("digits", model.spec, "float32"))
    assert str(refusal.value).startswith(
        f"Redis at redis://127.0.0.1:{acl_redis.port}/0 refused the command to ACL user 'infer': "
    )
    assert acl_passwords["infer"] not in str(refusal.value)
    (entry,) = denied(acl_redis)
    assert (entry["username"], entry["count"]) == ("infer", 1)  # tried once
    assert leaked.get_blob("digits", 1) == blob


def test_the_ACL_file_works_on_a_tls_redis_7(start_tls_redis, pki, acl_passwords, tmp_path, monkeypatch):
    """What the compose stack runs: Redis 7, TLS only, these users."""
    server = start_tls_redis(aclfile=tmp_path / "users.acl")
    trust(monkeypatch, pki)
    trainer = CheckpointStore(connect(as_user(server, "trainer", acl_passwords["trainer"])))
    reader = CheckpointStore(connect(as_user(server, "infer", acl_passwords["infer"])))
    subscription = reader.subscribe()
    version, _ = publish(trainer, seed=5)
    assert reader.latest("digits").meta.version == version
    assert wait_until(lambda: subscription.get_message(timeout=0.1), "the announcement")["type"] == "message"
    subscription.close()
    with pytest.raises(redis.exceptions.NoPermissionError):
        reader.redis.set(reader.keys_for("digits").blob(version), b"evil")
    assert denied(server)[0]["username"] == "infer"
