"""TLS for Tandem's servers and clients: the settings, the credentials, and binding a port.

gRPC servers take `ServerTLS.credentials()`; the inference service's HTTP port
(infer_svc.http) takes `ServerTLS.ssl_context()`, from the same files.

Servers (both services) read, from the environment:

    TANDEM_TLS_CERT, TANDEM_TLS_KEY   the server's certificate (chain) and key, PEM: TLS on
    TANDEM_TLS_CLIENT_CA              a CA, PEM: mutual TLS, a client must present a
                                      certificate it signed or the handshake fails

Clients (shared.client, the `tandem` CLI, the images' health check) read:

    TANDEM_TLS_CA                     the CA that signed the servers' certificates: TLS on
    TANDEM_TLS_CLIENT_CERT, TANDEM_TLS_CLIENT_KEY
                                      the client's own certificate and key, for mutual TLS
    TANDEM_TLS=true                   TLS trusting the system's roots (no TANDEM_TLS_CA)

The client's variables are distinct from the server's so that one
environment can hold both (a health check runs in the server's container; a
test or the demo runs servers and clients in one process) and a client never
presents a server's certificate by accident.

A server's files are re-read when they change, without a restart: grpc calls
the fetcher of its dynamic credentials before every new handshake, and the
fetcher stats the files first (cheap) and reloads only when one changed.
The HTTP port does the same from the ssl module's server-name callback, which
OpenSSL calls in every handshake: it hands the connection the context made
from the files' current contents. Connections already open keep the
certificate they were made with.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import grpc

from shared.env import env

log = logging.getLogger("tandem.tls")
Loaded = TypeVar("Loaded")  # what a server's TLS files are loaded as: a grpc or an ssl configuration


# ---------------------------------------------------------------- files


def _readable(path: str | Path, setting: str) -> Path:
    """`path` as a Path, once it is known readable; a ValueError naming `setting` otherwise."""
    try:
        with open(path, "rb"):
            pass
    except OSError as error:
        raise ValueError(f"{setting}={str(path)!r}: cannot read it: {error.strerror}") from None
    return Path(path)


def _no_password() -> bytes:
    raise ValueError("the key is encrypted; give an unencrypted PEM key (gRPC takes no password)")


def check_key_pair(cert: Path, key: Path) -> None:
    """Raise ValueError unless `cert` is a PEM certificate (chain) and `key` its private key.

    OpenSSL (the ssl module) does the check: a mismatched pair would only
    show later, as every handshake failing.
    """
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as error:
        raise ValueError(f"{cert} and {key} are not a PEM certificate and its key: {error}") from None


def check_ca(ca: Path) -> None:
    """Raise ValueError unless `ca` holds PEM certificates."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=ca)
    except (ssl.SSLError, OSError) as error:
        raise ValueError(f"{ca} is not a PEM CA certificate: {error}") from None


# ---------------------------------------------------------------- the server's side


@dataclass(frozen=True)
class ServerTLS:
    """A server's certificate and key, and with `client_ca`, mutual TLS."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_env(cls) -> ServerTLS | None:
        """TANDEM_TLS_CERT/KEY (and TANDEM_TLS_CLIENT_CA), each checked readable; None without."""
        cert, key = env("TANDEM_TLS_CERT", None), env("TANDEM_TLS_KEY", None)
        client_ca = env("TANDEM_TLS_CLIENT_CA", None)
        if cert is None and key is None:
            if client_ca is not None:
                raise ValueError("TANDEM_TLS_CLIENT_CA needs TANDEM_TLS_CERT and TANDEM_TLS_KEY too")
            return None
        if cert is None or key is None:
            raise ValueError("TANDEM_TLS_CERT and TANDEM_TLS_KEY go together: set both or neither")
        return cls(
            _readable(cert, "TANDEM_TLS_CERT"),
            _readable(key, "TANDEM_TLS_KEY"),
            client_ca and _readable(client_ca, "TANDEM_TLS_CLIENT_CA"),
        )

    def check(self) -> None:
        """Raise ValueError unless the files are what they should be (at start: a clear stop)."""
        check_key_pair(self.cert, self.key)
        if self.client_ca is not None:
            check_ca(self.client_ca)

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials that follow the files: each new connection gets their current contents.
        Checked first, so that a server given a bad pair stops at start."""
        self.check()
        files = CertificateFiles(self, grpc_configuration)
        return grpc.dynamic_ssl_server_credentials(
            files.initial, files, require_client_authentication=self.client_ca is not None
        )

    def ssl_context(self) -> ssl.SSLContext:
        """An ssl server context that follows the files: each new connection gets their current
        contents (through the context's server-name callback, which OpenSSL calls in every
        handshake, with or without a name). Checked first, as `credentials` is."""
        self.check()
        files = CertificateFiles(self, ssl_server_context)
        listening = files.initial  # every connection's SSL object is made from this one
        current = listening

        def follow_the_files(connection, server_name, context) -> None:
            nonlocal current
            current = files() or current
            if current is not listening:
                connection.context = current  # OpenSSL's SSL_set_SSL_CTX: this connection's certificate

        listening.sni_callback = follow_the_files
        return listening


def grpc_configuration(tls: ServerTLS) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
    )


def ssl_server_context(tls: ServerTLS) -> ssl.SSLContext:
    """An ssl context serving `tls`'s certificate; with a client CA, requiring a client certificate
    it signed (as grpc's require_client_authentication does)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert, tls.key, password=_no_password)
    if tls.client_ca is not None:
        context.load_verify_locations(cafile=tls.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class CertificateFiles(Generic[Loaded]):
    """A ServerTLS's files as last loaded by `load`; called (before each handshake) it returns a
    new configuration when they changed, else None (keep the current one).

    A change is seen by stat (inode, size, mtime), so an unchanged set costs
    a stat per file. A set that does not load (a rotation half done: a new
    certificate beside the old key) keeps the current configuration, is
    logged once, and is tried again at the next handshake.
    """

    def __init__(self, tls: ServerTLS, load: Callable[[ServerTLS], Loaded]):
        self._tls, self._load = tls, load
        self._paths = [path for path in (tls.cert, tls.key, tls.client_ca) if path is not None]
        self._lock = threading.Lock()  # handshakes may call in from several threads
        self._failed: tuple | None = None  # the files' stat when they last failed to load
        self._loaded = self._stat()
        self.initial = load(tls)

    def __call__(self) -> Loaded | None:
        signature = self._stat()
        if signature == self._loaded:
            return None
        with self._lock:
            if signature == self._loaded:  # another handshake reloaded them meanwhile
                return None
            try:
                self._tls.check()
                configuration = self._load(self._tls)
            except (ValueError, OSError, ssl.SSLError) as error:
                if signature != self._failed:
                    log.warning(
                        "event=tls_reload_failed cert=%s: %s; serving the previous certificate",
                        self._tls.cert,
                        error,
                    )
                    self._failed = signature
                return None
            if self._stat() != signature:  # changed again while being read: next handshake
                return None
            self._loaded = signature
        log.info("event=tls_reloaded cert=%s", self._tls.cert)
        return configuration

    def _stat(self) -> tuple:
        def one(path: Path):
            try:
                status = os.stat(path)
            except OSError:
                return None
            return status.st_ino, status.st_size, status.st_mtime_ns

        return tuple(one(path) for path in self._paths)


def is_loopback(address: str) -> bool:
    """Whether a gRPC listen address ("127.0.0.1:50051", "[::1]:0", "localhost:1") is loopback only.

    Unix sockets count as local; a host name other than localhost, and the
    wildcard addresses (0.0.0.0, [::], an empty host), do not.
    """
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def listen(server: grpc.Server, address: str, tls: ServerTLS | None) -> int:
    """Bind `server` to `address`, with TLS when `tls` is given; return the port bound.

    Plaintext is the default for 127.0.0.1; plaintext on any other address
    is allowed (behind a TLS-terminating proxy, on a private network) but
    logged loudly at start.
    """
    if tls is not None:
        log.info(
            "event=tls_on listen=%s cert=%s client_certificates=%s",
            address,
            tls.cert,
            f"required, signed by {tls.client_ca}" if tls.client_ca else "not asked for",
        )
        return server.add_secure_port(address, tls.credentials())
    warn_if_plaintext_on_network(address, "gRPC")
    return server.add_insecure_port(address)


def warn_if_plaintext_on_network(address: str, protocol: str) -> None:
    """Log loudly that `protocol` ("gRPC", "HTTP") is served without TLS at `address`, unless
    that is loopback only."""
    if not is_loopback(address):
        log.warning(
            "event=plaintext_on_network listen=%s: %s WITHOUT TLS on a non-loopback "
            "address; anyone on the network can read and send calls. Set "
            "TANDEM_TLS_CERT and TANDEM_TLS_KEY to serve TLS.",
            address,
            protocol,
        )


# ---------------------------------------------------------------- the client's side


@dataclass(frozen=True)
class ClientTLS:
    """How a client speaks TLS: the CA to trust (None: the system's roots) and, for mutual TLS,
    its own certificate and key. Each file is checked readable when this is made."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate and its key go together: give both or neither")
        for name, what in (
            ("ca", "the TLS CA"),
            ("cert", "the TLS client certificate"),
            ("key", "the TLS client key"),
        ):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _readable(getattr(self, name), what))

    @classmethod
    def from_env(cls) -> ClientTLS | None:
        """TANDEM_TLS_CA, TANDEM_TLS_CLIENT_CERT/KEY, TANDEM_TLS; None (plaintext) without them."""
        ca = env("TANDEM_TLS_CA", None)
        cert, key = env("TANDEM_TLS_CLIENT_CERT", None), env("TANDEM_TLS_CLIENT_KEY", None)
        if not (ca or cert or key or env("TANDEM_TLS", False, bool)):
            return None
        if (cert is None) != (key is None):
            raise ValueError("TANDEM_TLS_CLIENT_CERT and TANDEM_TLS_CLIENT_KEY go together")
        return cls(
            ca and _readable(ca, "TANDEM_TLS_CA"),
            cert and _readable(cert, "TANDEM_TLS_CLIENT_CERT"),
            key and _readable(key, "TANDEM_TLS_CLIENT_KEY"),
        )

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return path.read_bytes() if path is not None else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca), private_key=read(self.key), certificate_chain=read(self.cert)
        )


def channel(target: str, tls: ClientTLS | None, options: list | None = None) -> grpc.Channel:
    """A channel to `target`: TLS when `tls` is given, else plaintext."""
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=options)
