"""Connecting to Redis: addresses, passwords, bytes, and bounded retries, against real servers."""

import time
from urllib.parse import quote

import numpy as np
import pytest
from redis.connection import SSLConnection

from shared.checkpoints.redis_client import (
    PACKER_BUFFER_CUTOFF,
    REQUEST_PACKER,
    Pieces,
    StoreUnavailable,
    connect,
    describe,
    redis_url_from_env,
    unavailable_on_error,
)
from shared.embedded.redis_server import EmbeddedRedis

PASSWORD = "s3cret p@ss:/word"


def test_pieces_are_stored_as_one_value_and_large_ones_sent_uncopied(private_redis):
    large = np.arange(10_000, dtype=np.float32)  # 40 kB, over the packer's cutoff
    small = np.arange(3, dtype=np.float64)
    pieces = Pieces([b"head", large.data, small.data, b""])
    client = connect(private_redis.url)
    client.execute_command("SET", "plain", Pieces([b"one piece"]))
    with client.pipeline(transaction=True) as pipe:  # as a publish sends them: inside MULTI/EXEC
        pipe.execute_command("SET", "k", pieces)
        pipe.execute()
    assert client.get("k") == b"head" + large.tobytes() + small.tobytes()
    assert client.get("plain") == b"one piece"
    chunks = REQUEST_PACKER.pack("SET", "k", pieces)
    [sent] = [chunk for chunk in chunks if isinstance(chunk, memoryview)]
    assert len(sent) > PACKER_BUFFER_CUTOFF and np.shares_memory(np.frombuffer(sent, np.uint8), large)
    assert b"".join(chunks) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n%s\r\n" % (
        pieces.nbytes,
        b"head" + large.tobytes() + small.tobytes(),
    )


def test_the_address_comes_from_redis_url(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://cache.internal:6390/2")
    assert redis_url_from_env() == "redis://cache.internal:6390/2"
    assert describe(connect()) == "redis://cache.internal:6390/2"
    monkeypatch.delenv("REDIS_URL")
    with pytest.raises(ValueError, match="set REDIS_URL"):
        connect()


def test_rediss_means_tls_and_describe_never_shows_credentials():
    client = connect("rediss://reader:hunter2@cache.internal:6380/3")
    assert issubclass(client.connection_pool.connection_class, SSLConnection)
    assert describe(client) == "rediss://cache.internal:6380/3"
    assert "hunter2" not in repr(client)


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_values_round_trip_as_bytes(tcp):
    with EmbeddedRedis(tcp=tcp) as server:
        client = connect(server.url)
        value = bytes(range(256)) * 4096
        client.set("blob", value)
        assert client.get("blob") == value


def test_password_in_the_url_or_in_redis_password(monkeypatch):
    with EmbeddedRedis(tcp=True, password=PASSWORD) as server:
        assert connect(server.url).ping()
        monkeypatch.setenv("REDIS_PASSWORD", PASSWORD)
        assert connect(f"redis://127.0.0.1:{server.port}").ping()


def test_a_wrong_password_fails_at_once_without_showing_it():
    with EmbeddedRedis(tcp=True, password=PASSWORD) as server:
        client = connect(f"redis://:{quote('not-' + PASSWORD, safe='')}@127.0.0.1:{server.port}")
        started = time.monotonic()
        with (
            pytest.raises(StoreUnavailable, match="refused the credentials") as refused,
            unavailable_on_error(client),
        ):
            client.ping()
        assert time.monotonic() - started < 2.0
        assert PASSWORD not in str(refused.value)


def test_a_down_server_fails_after_bounded_retries_with_backoff():
    with EmbeddedRedis(tcp=True, password=PASSWORD) as server:
        client = connect(server.url, retries=3)
        with server.down():
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as unavailable, unavailable_on_error(client):
                client.get("anything")
            elapsed = time.monotonic() - started
    message = str(unavailable.value)
    assert message.startswith(f"Redis at redis://127.0.0.1:{server.port}/0 unavailable after 4 attempts: ")
    assert "Connection refused" in message and "p@ss" not in message
    assert 0.1 + 0.2 + 0.4 <= elapsed < 5.0  # backed off between attempts, then gave up


def test_a_restart_is_ridden_out_by_the_retries(private_redis):
    client = connect(private_redis.url)
    client.set("k", b"v")
    private_redis.restart()  # the pooled connection is now dead
    assert client.ping()
    assert client.get("k") is None  # no persistence


def test_the_password_may_come_from_a_file_as_docker_secrets_give_it(monkeypatch, tmp_path):
    secret = tmp_path / "redis_password"
    secret.write_text(PASSWORD + "\n")
    with EmbeddedRedis(tcp=True, password=PASSWORD) as server:
        monkeypatch.setenv("REDIS_PASSWORD_FILE", str(secret))
        assert connect(f"redis://127.0.0.1:{server.port}").ping()
        monkeypatch.setenv("REDIS_PASSWORD", PASSWORD)
        with pytest.raises(ValueError, match="REDIS_PASSWORD or REDIS_PASSWORD_FILE, not both"):
            connect(f"redis://127.0.0.1:{server.port}")


def test_the_acl_user_comes_from_the_url_or_redis_username(monkeypatch):
    monkeypatch.setenv("REDIS_USERNAME", "infer")
    assert connect("redis://cache.internal:6379").connection_pool.connection_kwargs["username"] == "infer"
    assert (
        connect("redis://trainer@cache.internal:6379").connection_pool.connection_kwargs["username"]
        == "trainer"
    )


@pytest.mark.parametrize(
    "settings, url, words",
    [
        (
            {"REDIS_TLS_CA": "missing.pem"},
            "rediss://cache.internal:6380",
            r"REDIS_TLS_CA='.*missing.pem': no such file",
        ),
        ({"REDIS_TLS_CERT": "missing.crt"}, "rediss://cache.internal:6380", "REDIS_TLS_CERT='.*missing.crt'"),
        (
            {"REDIS_PASSWORD_FILE": "missing"},
            "redis://cache.internal:6379",
            "REDIS_PASSWORD_FILE='.*missing'",
        ),
        (
            {"REDIS_PASSWORD_FILE": "empty"},
            "redis://cache.internal:6379",
            "REDIS_PASSWORD_FILE='.*empty': the file is empty",
        ),
        (
            {"REDIS_TLS_CA": "ca.pem"},
            "redis://cache.internal:6379",
            "REDIS_TLS_CA set, but the Redis address is redis://",
        ),
        (
            {"REDIS_TLS_CERT": "client.crt"},
            "rediss://cache.internal:6380",
            "REDIS_TLS_CERT and REDIS_TLS_KEY go together",
        ),
    ],
    ids=[
        "missing-ca",
        "missing-cert",
        "missing-password-file",
        "empty-password-file",
        "tls-without-rediss",
        "cert-without-key",
    ],
)
def test_settings_that_cannot_be_followed_stop_the_service_at_start(
    monkeypatch, tmp_path, settings, url, words
):
    for name in ("ca.pem", "client.crt"):
        (tmp_path / name).write_text("PEM")
    (tmp_path / "empty").write_text("")
    for name, file in settings.items():
        monkeypatch.setenv(name, str(tmp_path / file))
    with pytest.raises(ValueError, match=words):
        connect(url)


def test_a_sentinel_address_takes_the_same_credentials_and_tls_settings(monkeypatch, tmp_path):
    (tmp_path / "ca.pem").write_text("PEM")
    monkeypatch.setenv("REDIS_USERNAME", "trainer")
    monkeypatch.setenv("REDIS_PASSWORD", PASSWORD)
    monkeypatch.setenv("REDIS_TLS_CA", str(tmp_path / "ca.pem"))
    settings = connect("rediss+sentinel://s1,s2:26380/tandem/1").connection_pool.connection_kwargs
    assert (settings["username"], settings["password"], settings["db"]) == ("trainer", PASSWORD, 1)
    assert settings["ssl_ca_certs"] == str(tmp_path / "ca.pem")
    with pytest.raises(ValueError, match="REDIS_TLS_CA set, but the Redis address is redis\\+sentinel://"):
        connect("redis+sentinel://s1/tandem")
