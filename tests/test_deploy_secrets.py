"""The compose stack's secrets (shared.security.deploy_secrets) and the Redis users of a Redis that
fails over (shared.security.redis_acl): the replicas' and the Sentinels' users, their passwords,
and the certificates that name every data node and Sentinel (docker-compose.ha.yml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis
from cryptography import x509

from shared.checkpoints.redis_client import connect
from shared.embedded.redis_server import EmbeddedRedis
from shared.security.certs import CertificateAuthority
from shared.security.deploy_secrets import make_secrets
from shared.security.redis_acl import acl_file_text, password_hash
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[1]


def names(cert: Path) -> set[str]:
    san = (
        x509.load_pem_x509_certificate(cert.read_bytes())
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    return {str(name) for name in san.get_values_for_type(x509.DNSName)} | {
        str(address) for address in san.get_values_for_type(x509.IPAddress)
    }


def test_the_secrets_hold_a_user_and_a_certificate_for_the_replicas_and_the_sentinels(tmp_path):
    made = make_secrets(tmp_path, service_uid=10001, redis_gid=10002)
    assert {"redis/replication.password", "sentinel/redis.password", "sentinel/server.crt"} <= set(made)
    assert names(tmp_path / "redis" / "server.crt") == {"redis", "redis-replica", "localhost", "127.0.0.1"}
    assert names(tmp_path / "sentinel" / "server.crt") == {
        "sentinel-1",
        "sentinel-2",
        "sentinel-3",
        "localhost",
        "127.0.0.1",
    }
    acl = (tmp_path / "redis" / "users.acl").read_text()
    for user, password_file in (
        ("replication", tmp_path / "redis" / "replication.password"),
        ("sentinel", tmp_path / "sentinel" / "redis.password"),
        ("trainer", tmp_path / "trainer" / "redis.password"),
    ):
        password = password_file.read_text()
        assert f"user {user} reset resetchannels on #{password_hash(password)} " in acl
        assert password not in acl
    assert make_secrets(tmp_path, service_uid=10001, redis_gid=10002) == []  # all there: kept


def test_a_certificate_without_a_name_it_needs_is_made_anew(tmp_path):
    make_secrets(tmp_path, service_uid=10001, redis_gid=10002)
    ca = CertificateAuthority.load(tmp_path / "ca" / "ca.crt", tmp_path / "ca" / "ca.key", days=1)
    ca.issue("redis", hosts=("redis", "localhost", "127.0.0.1")).write(
        tmp_path / "redis" / "server"
    )  # as before HA
    key = (tmp_path / "redis" / "server.key").read_bytes()
    assert make_secrets(tmp_path, service_uid=10001, redis_gid=10002) == [
        "redis/server.crt",
        "redis/server.key",
    ]
    assert "redis-replica" in names(tmp_path / "redis" / "server.crt")
    assert (tmp_path / "redis" / "server.key").read_bytes() != key


def test_the_acl_file_has_the_optional_users_only_with_their_passwords():
    services = {"trainer": "t-pass", "infer": "i-pass"}
    assert "user replication" not in acl_file_text(services)
    with_ha = acl_file_text({**services, "replication": "r-pass", "sentinel": "s-pass"})
    assert (
        f"user replication reset resetchannels on #{password_hash('r-pass')} +psync +replconf +ping"
        in with_ha
    )
    with pytest.raises(ValueError, match="need a password"):
        acl_file_text({**services, "admin": "x"})
    with pytest.raises(ValueError, match="need a password"):
        acl_file_text({"trainer": "t-pass", "replication": "r-pass"})


def test_the_cli_writes_the_optional_users_when_given_their_password_files(tmp_path):
    for user in ("trainer", "infer", "replication"):
        (tmp_path / f"{user}.password").write_text(f"{user}-secret\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.security.redis_acl",
            *(
                f"--{user}-password-file={tmp_path / f'{user}.password'}"
                for user in ("trainer", "infer", "replication")
            ),
            "--out",
            str(tmp_path / "users.acl"),
        ],
        check=True,
        capture_output=True,
        timeout=60,
        cwd=REPO,
    )
    acl = (tmp_path / "users.acl").read_text()
    assert f"#{password_hash('replication-secret')}" in acl and "user sentinel" not in acl


def test_a_replica_syncs_from_its_primary_as_the_replication_user(tmp_path):
    """The `replication` user's rights are enough for a real replica (and nothing more is given)."""
    passwords = {"trainer": "t-pass", "infer": "i-pass", "replication": "r-pass", "sentinel": "s-pass"}
    aclfile = tmp_path / "users.acl"
    aclfile.write_text(acl_file_text(passwords) + "user admin on >admin-pass ~* &* +@all\n")
    with EmbeddedRedis(tcp=True, aclfile=aclfile) as primary:
        trainer = connect(primary.url.replace("://", "://trainer:t-pass@", 1))
        trainer.set("tandem:probe", b"1")
        replica_args = ["--replicaof", "127.0.0.1", str(primary.port)]
        replica_args += ["--masteruser", "replication", "--masterauth", "r-pass"]
        with EmbeddedRedis(tcp=True, aclfile=aclfile, extra_args=replica_args) as replica:
            admin = connect(replica.url.replace("://", "://admin:admin-pass@", 1))
            wait_until(
                lambda: admin.info("replication").get("master_link_status") == "up", "the replica in sync"
            )
            wait_until(lambda: admin.get("tandem:probe") == b"1", "the key on the replica")
        as_replication = connect(primary.url.replace("://", "://replication:r-pass@", 1), retries=0)
        with pytest.raises(redis.exceptions.NoPermissionError):
            as_replication.get("tandem:probe")
        assert connect(primary.url.replace("://", "://admin:admin-pass@", 1)).acl_log() != []
