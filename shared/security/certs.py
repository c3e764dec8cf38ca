"""X.509 certificates made here: a CA, and the server and client certificates it signs.

The compose stack makes its own on first start (shared.security.deploy_secrets), the
TLS tests make theirs in each test, and `make demo TLS=1` makes throwaway
ones; all through this module:

    ca = CertificateAuthority.new("tandem-ca", days=3650)
    server = ca.issue("trainer", hosts=("trainer", "localhost", "127.0.0.1"))   # serverAuth
    client = ca.issue("alice", client=True)                                      # clientAuth, CN=alice
    expired = ca.issue("old", hosts=("127.0.0.1",), expired=True)               # for tests
    server.write(directory / "trainer")          # trainer.crt, trainer.key (PEM)
    ca.write(directory / "ca.crt")               # the certificate alone: what clients trust

EC P-256 keys: quick to make, and what grpc and Redis accept. Needs the
`cryptography` package.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLOCK_SKEW = datetime.timedelta(minutes=5)  # valid from a little before now: clocks differ


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only, from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM bytes."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, stem: Path) -> dict[str, Path]:
        """Write `STEM.crt` and `STEM.key` (the key readable by its owner only); return their paths."""
        cert, key = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert.parent.mkdir(parents=True, exist_ok=True)
        cert.write_bytes(self.cert_pem)
        write_private(key, self.key_pem)
        return {"cert": cert, "key": key}


class CertificateAuthority:
    def __init__(self, cert: x509.Certificate, key: CertificateIssuerPrivateKeyTypes, days: int = 1):
        self.cert, self._key, self.days = cert, key, days

    @classmethod
    def new(cls, common_name: str = "tandem-test-ca", days: int = 1) -> CertificateAuthority:
        """A fresh CA valid for `days`; the certificates it issues are valid as long."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, days)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path, days: int) -> CertificateAuthority:
        """A CA from its PEM files, to issue more certificates (valid `days`)."""
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        # A CA's key file holds a signing key (ours are P-256, from `new`); a key of a kind
        # that cannot sign fails in `issue`, as cryptography's sign() refuses it.
        return cls(
            x509.load_pem_x509_certificate(cert_path.read_bytes()),
            cast(CertificateIssuerPrivateKeyTypes, key),
            days,
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        """Write the CA's certificate (public: what clients trust)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.cert_pem)
        return path

    def write_key(self, path: Path) -> Path:
        write_private(path, _key_pem(self._key))
        return path

    def issue(
        self, common_name: str, *, hosts: tuple[str, ...] = (), client: bool = False, expired: bool = False
    ) -> Issued:
        """A certificate for `hosts` (a server's) or, with `client`, one a client presents."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start, end = (
            (now - datetime.timedelta(days=2), now - datetime.timedelta(days=1))
            if expired
            else (now - CLOCK_SKEW, now + datetime.timedelta(days=self.days))
        )
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False
            )
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))
