"""Connecting to Redis: the address and secrets from the environment, bounded retries, one clear error.

`REDIS_URL` names the server:

    redis://[[user]:password@]host[:port][/db]        TCP
    rediss://[[user]:password@]host[:port][/db]       TCP with TLS
    unix://[[user]:password@]/path/to/redis.sock[?db=N]
    redis+sentinel://[[user]:password@]host:port[,host:port...]/MASTER_NAME[/db]
    rediss+sentinel://...                             the same, TLS to the data nodes

A sentinel address names Redis Sentinels (port 26379 unless given) and the
name they monitor the primary under. The client asks them where the primary
is, and asks again whenever a connection to it fails or it answers READONLY
(it was demoted): after a failover it finds the promoted replica by itself,
within its retries. The user, password and REDIS_TLS_* settings are those of
the data nodes (primary and replicas); the sentinels are asked in plaintext,
without credentials. With TLS, the data nodes' certificates must name the
address the sentinels report for them (usually an IP address).

The rest of the settings keep secrets out of the URL; a user or password in
the URL wins over them:

    REDIS_USERNAME        the ACL user (else Redis's `default`)
    REDIS_PASSWORD        its password, or
    REDIS_PASSWORD_FILE   a file holding it (a Docker secret); one trailing newline is dropped
    REDIS_TLS_CA          rediss:// only: the CA file (PEM) that the server's certificate
                          must chain to (else the system's CAs)
    REDIS_TLS_CERT        rediss:// only: the client certificate (PEM) for a Redis with
    REDIS_TLS_KEY         `tls-auth-clients yes`, and its private key; set both or neither
    REDIS_MIN_REPLICAS_ACK        how many replicas must acknowledge a checkpoint publish
                                  (WAIT, see shared.checkpoints.store); 0, the default: no waiting
    REDIS_REPLICA_ACK_TIMEOUT_MS  how long a publish waits for them (default 1000)

A setting that names a missing file, or TLS settings with an address that
is not rediss://, is a ValueError naming the variable: the service stops at
start rather than connecting some other way than it was told. Passwords
(percent-encode special characters in a URL) never appear in messages:
`describe` rebuilds the address from the connection's settings, without
credentials.

A command that fails with a ConnectionError or TimeoutError is retried with
exponential backoff (0.1 s, 0.2 s, 0.4 s, … capped at 2 s, 6 retries: about 5 s
in all), which rides out a Redis restart; with a sentinel address, each retry
asks the sentinels again, which rides out a failover (measured with the
embedded HA set, `down-after-milliseconds` 1000: publishes stall about 4 s). Once the retries are used up, the
code that called Redis raises `StoreUnavailable` (see `unavailable_on_error`).
What waiting does not fix is not retried: a refused password, a server
certificate that does not verify (wrong CA, expired, another host's), a TLS
handshake the server refuses (no client certificate, or one it does not
trust), and a command the ACL user may not run (NOPERM).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.connection import Encoder, PythonRespSerializer, SSLConnection, UnixDomainSocketConnection
from redis.maint_notifications import MaintNotificationsConfig
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

from shared.env import env, read_secret_file

DEFAULT_RETRIES = 6
DEFAULT_TIMEOUT = 10.0  # seconds, for connecting and for each reply
HEALTH_CHECK_INTERVAL = 15  # seconds idle before a pooled connection is PINGed
BACKOFF = ExponentialBackoff(base=0.05, cap=2.0)  # waits base * 2**failure
PACKER_BUFFER_CUTOFF = 6000  # bytes: larger values are sent as chunks of their own (redis-py's figure)


class Pieces:
    """A value that Redis stores as the concatenation of `buffers`, sent without joining them.

    The request packer of a client made by `connect` writes each buffer to the
    socket as it is: a checkpoint's tensors go from the model's arrays to Redis
    uncopied (shared.checkpoints.checkpoint.encode_parts). Small buffers are
    copied into the command's own (fewer system calls).
    """

    def __init__(self, buffers: Iterable[bytes | memoryview]):
        self.buffers = tuple(memoryview(buffer).cast("B") for buffer in buffers)
        self.nbytes = sum(len(buffer) for buffer in self.buffers)


class _RequestPacker(PythonRespSerializer):
    """redis-py's own request serializer, which also packs `Pieces`.

    Replies are parsed by hiredis (redis[hiredis]: a 19 MB GET 100 ms -> 31 ms here), but
    requests by redis-py's serializer: with hiredis installed redis-py packs them with hiredis
    too, which copies a large value into one buffer (a 19 MB SET 10 ms -> 55 ms here), where
    its own sends a large value as a separate chunk, uncopied.
    """

    def pack(self, *args):
        if not any(isinstance(arg, Pieces) for arg in args):
            return super().pack(*args)
        # RESP, as the serializer writes it: *<count> then $<length> and the bytes per argument.
        command = (*self.encode(args[0]).split(), *args[1:])  # "CONFIG GET" is two arguments
        chunks: list[bytes | memoryview] = [b"*%d\r\n" % len(command)]
        for arg in command:
            if isinstance(arg, Pieces):
                chunks.append(b"$%d\r\n" % arg.nbytes)
                chunks += (bytes(b) if len(b) < self._buffer_cutoff else b for b in arg.buffers)
                chunks.append(b"\r\n")
            else:
                value = self.encode(arg)
                chunks.append(b"$%d\r\n%s\r\n" % (len(value), value))
        return chunks  # the connection joins the small chunks and sends large ones as they are


REQUEST_PACKER = _RequestPacker(PACKER_BUFFER_CUTOFF, Encoder("utf-8", "strict", False).encode)
SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS to the data nodes
DEFAULT_SENTINEL_PORT = 26379
SENTINEL_TIMEOUT = 2.0  # seconds, for each sentinel asked; the next one is asked when it fails
DEFAULT_REPLICA_ACK_TIMEOUT_MS = 1000
# TLS errors that are a dropped connection (a restart), not a refusal: retried.
DROPPED_TLS_ERRORS = (
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
    ssl.SSLSyscallError,
    ssl.SSLWantReadError,
    ssl.SSLWantWriteError,
)


class StoreUnavailable(RuntimeError):
    """Redis could not be reached (or refused the command) after the client's retries."""


def tls_refusal(error: BaseException | None) -> ssl.SSLError | None:
    """The TLS failure behind a redis-py error when it is one that waiting does not fix.

    redis-py wraps ssl's errors in a ConnectionError (the original is its
    context): a certificate that does not verify (ssl.SSLCertVerificationError),
    or an alert from the server refusing the handshake (no client
    certificate, an untrusted one, no common protocol version).
    """
    while error is not None:
        if isinstance(error, ssl.SSLError) and not isinstance(error, DROPPED_TLS_ERRORS):
            return error
        error = error.__cause__ or error.__context__
    return None


class TransientErrorRetry(Retry):
    """redis-py's Retry, except that it gives up at once on errors that waiting does not fix.

    Those are an AuthenticationError and a TLS refusal (`tls_refusal`).
    redis-py counts both as ConnectionErrors, and retries them; without a
    password, its handshake even nests two retry loops (about 40 s before the
    error shows).
    """

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def transient(error: Exception) -> bool:
            return (
                not isinstance(error, redis.AuthenticationError)
                and tls_refusal(error) is None
                and (is_retryable is None or is_retryable(error))
            )

        return super().call_with_retry(do, fail, transient, with_failure_count)


def redis_url_from_env() -> str | None:
    return os.environ.get("REDIS_URL") or None


def connect(
    url: str | None = None,
    *,
    retries: int = DEFAULT_RETRIES,
    timeout: float = DEFAULT_TIMEOUT,
    readonly: bool = False,
) -> redis.Redis:
    """A client for `url` (default: `REDIS_URL`); it connects lazily, on the first command.

    Credentials and TLS come from the settings in the module docstring.
    Replies are bytes (decode_responses=False): checkpoints are binary. A new
    connection sends no CLIENT command (redis-py's CLIENT SETINFO, and CLIENT
    MAINT_NOTIFICATIONS, for Redis Enterprise's maintenance events): the ACL
    users allow none (Redis 7.0 cannot even name SETINFO in an ACL), and each
    refusal would be one more entry in Redis's ACL LOG.

    `readonly=True`, for a sentinel address, reads from the replicas (round
    robin, the primary when none is up): for readers that can take data a
    moment old. A client of one server is the same either way.
    """
    url = url or redis_url_from_env()
    if not url:
        raise ValueError(
            "no Redis address: set REDIS_URL (redis://, rediss://, unix:// or redis+sentinel://)"
        )
    scheme = urlsplit(url).scheme
    settings = {
        "username": env("REDIS_USERNAME", None),
        "password": _password_from_env(),
        **_tls_settings_from_env(scheme),
        "decode_responses": False,
        "command_packer": REQUEST_PACKER,
        "driver_info": None,
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        "retry": TransientErrorRetry(BACKOFF, retries),
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
    }
    if scheme in SENTINEL_SCHEMES:
        return _connect_via_sentinels(parse_sentinel_url(url), settings, timeout, readonly)
    try:
        return redis.Redis.from_url(url, **settings)
    except ValueError as error:  # not an address redis-py can parse; never quoted: it may hold a password
        raise ValueError(f"REDIS_URL: {error}") from None


@dataclass(frozen=True)
class SentinelAddress:
    """A parsed redis+sentinel:// address."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:  # never the password
        return f"SentinelAddress({describe_sentinels(self)!r})"


def describe_sentinels(address: SentinelAddress) -> str:
    """The address as a URL, without username or password."""
    scheme = "rediss+sentinel" if address.tls else "redis+sentinel"
    hosts = ",".join(
        f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in address.sentinels
    )
    return f"{scheme}://{hosts}/{address.master_name}/{address.db}"


def parse_sentinel_url(url: str) -> SentinelAddress:
    """`redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/MASTER_NAME[/db]`.

    A ValueError naming REDIS_URL (never quoting it: it may hold a password)
    for an address that does not say which sentinels, or which primary.
    """
    form = "redis+sentinel://host:26379[,host:26379...]/MASTER_NAME[/db]"
    scheme, rest = url.split("://", 1)
    if scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"REDIS_URL: {scheme}:// is not a sentinel address ({form})")
    netloc, _, path = rest.partition("/")
    path, _, query = path.partition("?")
    if query or "#" in path:
        raise ValueError(f"REDIS_URL: a sentinel address takes no ?options or #fragment ({form})")
    credentials, _, hosts = netloc.rpartition("@")
    username = password = None
    if credentials:
        user, colon, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    sentinels = tuple(_sentinel_host(host, form) for host in hosts.split(","))
    name, _, db = path.partition("/")
    name = unquote(name)
    if not name:
        raise ValueError(f"REDIS_URL: a sentinel address names the master after the hosts ({form})")
    db = db.rstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"REDIS_URL: the database after the master name must be a number, got {db!r}")
    if "/" in db:
        raise ValueError(f"REDIS_URL: nothing may follow the database number ({form})")
    return SentinelAddress(sentinels, name, int(db or 0), SENTINEL_SCHEMES[scheme], username, password)


def _sentinel_host(text: str, form: str) -> tuple[str, int]:
    if not text:
        raise ValueError(
            f"REDIS_URL: a sentinel address needs one host or more, separated by commas ({form})"
        )
    if text.startswith("["):  # [IPv6]:port
        host, bracket, port = text[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise ValueError(f"REDIS_URL: malformed sentinel host {text!r} ({form})")
        port = port[1:]
    else:
        host, _, port = text.partition(":")
    if not host:
        raise ValueError(f"REDIS_URL: a sentinel host has no name in {text!r} ({form})")
    if not port:
        return host, DEFAULT_SENTINEL_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"REDIS_URL: sentinel {host!r} has port {port!r}, not a number from 1 to 65535")
    return host, int(port)


class _SentinelConnection(SentinelManagedConnection):
    """A connection to the primary, which asks the Sentinels where it is on every connect.

    redis-py's own asks only when the pool first connects it; a command's retry after a
    dropped or silent connection reconnects to the address it had (redis/redis-py#3874).
    After a failover whose old primary vanished without resetting its connections (a
    container gone), every retry would wait on the old address, and the command fail,
    however soon the replica was promoted.
    """

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True):
        if self._sock is None and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super().connect_check_health(check_health, retry_socket_connect)

    def _connect_retry(self):
        """redis-py's first connect, which would ask the Sentinels before the call above asks again."""
        if self._sock is None and self.connection_pool.is_master:
            self.connect_check_health(
                check_health=self.connection_pool.check_connection, retry_socket_connect=False
            )
        else:
            super()._connect_retry()


class _SentinelSSLConnection(
    _SentinelConnection, SSLConnection
):  # as redis-py's SentinelManagedSSLConnection
    pass


class _Sentinels(Sentinel):
    """redis-py's Sentinel, remembering the address it was made from (for `describe`).

    Its own list of sentinels is reordered as they answer, so it is not that.
    """

    def __init__(self, address: SentinelAddress, **kwargs):
        super().__init__(list(address.sentinels), **kwargs)
        self.address = address


def _connect_via_sentinels(
    address: SentinelAddress, settings: dict, timeout: float, readonly: bool
) -> redis.Redis:
    """A client of the primary (or, readonly, of the replicas) that the sentinels name.

    Each sentinel is asked once per discovery, with a short timeout, and the
    next one when it fails: the client's own retries (on the data connection)
    repeat the discovery, which rides out the seconds a failover takes.
    """
    settings = dict(settings)
    settings["username"] = address.username or settings["username"]  # the URL's win, as with from_url
    settings["password"] = address.password or settings["password"]
    quick = min(timeout, SENTINEL_TIMEOUT)
    sentinels = _Sentinels(
        address,
        sentinel_kwargs={
            "socket_connect_timeout": quick,
            "socket_timeout": quick,
            "retry": Retry(NoBackoff(), 0),
            "driver_info": None,
            "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        },
    )
    client_for = sentinels.slave_for if readonly else sentinels.master_for
    connection_class = _SentinelSSLConnection if address.tls else _SentinelConnection
    return client_for(address.master_name, db=address.db, connection_class=connection_class, **settings)


def _existing_file(path: str) -> str:
    if not Path(path).is_file():
        raise ValueError("no such file")
    return path


def _password_from_env() -> str | None:
    password, path = env("REDIS_PASSWORD", None), env("REDIS_PASSWORD_FILE", None, _existing_file)
    if path is None:
        return password
    if password is not None:
        raise ValueError("set REDIS_PASSWORD or REDIS_PASSWORD_FILE, not both")
    return read_secret_file(Path(path), f"REDIS_PASSWORD_FILE={path!r}")


def _tls_settings_from_env(scheme: str) -> dict:
    """redis-py's ssl_* arguments from REDIS_TLS_*.

    redis-py checks the server's certificate and host name by default; these add the CA to
    check it with and the client's own certificate.
    """
    names = {"ssl_ca_certs": "REDIS_TLS_CA", "ssl_certfile": "REDIS_TLS_CERT", "ssl_keyfile": "REDIS_TLS_KEY"}
    settings = {argument: env(name, None, _existing_file) for argument, name in names.items()}
    given = [names[argument] for argument, value in settings.items() if value is not None]
    if given and scheme not in ("rediss", "rediss+sentinel"):
        raise ValueError(
            f"{' and '.join(given)} set, but the Redis address is {scheme}://, "
            f"not rediss:// or rediss+sentinel://"
        )
    if (settings["ssl_certfile"] is None) != (settings["ssl_keyfile"] is None):
        raise ValueError("REDIS_TLS_CERT and REDIS_TLS_KEY go together: set both or neither")
    return settings if scheme in ("rediss", "rediss+sentinel") else {}


def describe(client: redis.Redis) -> str:
    """The client's server address as a URL, without username or password."""
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool) and isinstance(pool.sentinel_manager, _Sentinels):
        described = describe_sentinels(pool.sentinel_manager.address)
        return described if pool.is_master else f"{described} (replicas)"
    settings = pool.connection_kwargs
    db = settings.get("db", 0)
    if issubclass(pool.connection_class, UnixDomainSocketConnection):
        return f"unix://{settings['path']}" + (f"?db={db}" if db else "")
    scheme = "rediss" if issubclass(pool.connection_class, SSLConnection) else "redis"
    return f"{scheme}://{settings.get('host', 'localhost')}:{settings.get('port', 6379)}/{db}"


def _non_negative(text: str) -> int:
    number = int(text)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _positive(text: str) -> int:
    number = int(text)
    if number < 1:
        raise ValueError("must be 1 or more")
    return number


def min_replicas_ack_from_env() -> int:
    """REDIS_MIN_REPLICAS_ACK: replicas a publish waits for (0: none, the default)."""
    return env("REDIS_MIN_REPLICAS_ACK", 0, _non_negative)


def replica_ack_timeout_ms_from_env() -> int:
    """REDIS_REPLICA_ACK_TIMEOUT_MS: how long a publish waits for them, in milliseconds."""
    return env("REDIS_REPLICA_ACK_TIMEOUT_MS", DEFAULT_REPLICA_ACK_TIMEOUT_MS, _positive)


def packs_pieces(client: redis.Redis) -> bool:
    """Whether the client packs requests with REQUEST_PACKER (made by `connect`), which sends `Pieces`."""
    return client.connection_pool.connection_kwargs.get("command_packer") is REQUEST_PACKER


def read_timeout(client: redis.Redis) -> float | None:
    """How long the client waits for a reply; blocking commands must block for less."""
    return client.connection_pool.connection_kwargs.get("socket_timeout")


@contextmanager
def unavailable_on_error(client: redis.Redis):
    """Re-raise a Redis error that got past the client's retries as StoreUnavailable."""
    try:
        yield
    except redis.AuthenticationError as error:
        raise StoreUnavailable(f"Redis at {describe(client)} refused the credentials: {error}") from error
    except redis.exceptions.NoPermissionError as error:
        user = client.connection_pool.connection_kwargs.get("username") or "default"
        raise StoreUnavailable(
            f"Redis at {describe(client)} refused the command to ACL user {user!r}: {error}"
        ) from error
    except (redis.ConnectionError, redis.TimeoutError) as error:
        if refusal := tls_refusal(error):
            raise StoreUnavailable(f"Redis at {describe(client)}: {_tls_failure(refusal)}") from error
        retry = client.get_retry()  # None for a client made without retries
        attempts = (retry.get_retries() if retry is not None else 0) + 1
        raise StoreUnavailable(
            f"Redis at {describe(client)} unavailable after {attempts} attempts: {error}"
        ) from error
    except redis.RedisError as error:
        raise StoreUnavailable(f"Redis at {describe(client)} failed: {error}") from error


def _tls_failure(refusal: ssl.SSLError) -> str:
    if isinstance(refusal, ssl.SSLCertVerificationError):
        return (
            f"its TLS certificate could not be verified ({refusal.verify_message}); "
            f"check REDIS_TLS_CA and the host name in REDIS_URL"
        )
    return (
        f"the TLS handshake failed ({refusal.reason or refusal}); a Redis with "
        f"tls-auth-clients yes needs REDIS_TLS_CERT and REDIS_TLS_KEY signed by a CA it trusts"
    )
