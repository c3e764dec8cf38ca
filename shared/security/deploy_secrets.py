"""The compose stack's secrets, made on its first start: certificates, Redis users, tokens.

    python -m shared.security.deploy_secrets /secrets --service-uid 10001 --redis-gid 10002

docker-compose.yml runs this once per `up` (the `secrets` service, before
the others start) on the directory `TANDEM_SECRETS_DIR` (default
./secrets). It makes only what is missing, so a restart keeps everything
and deleting a file renews just that (a server certificate, say: the new
one is signed by the same CA). Each service mounts only its own folder,
so a service that is broken into reads no other's secrets:

    ca/        ca.crt, ca.key   the stack's CA; only this command reads ca.key
    public/    ca.crt           what clients trust (the host's too)
               tokens.json      the services' tokens file: hashes only (shared.security.auth)
    trainer/   server.crt, server.key, redis.password   (owned by --service-uid)
    infer/     server.crt, server.key, redis.password   (owned by --service-uid)
    redis/     server.crt, server.key, users.acl        (readable by group --redis-gid)
               replication.password                     the data nodes' `masterauth`
    sentinel/  server.crt, server.key, redis.password   (readable by group --redis-gid)
    clients/   admin.token, predict.token               the host's credentials (root's)

Server certificates name their service, `localhost` and `127.0.0.1` (the
published ports are reached there, and the health checks run inside the
containers). Redis's names both data nodes of the Redis that fails over
(docker-compose.ha.yml: `redis` and `redis-replica`, the names the Sentinels
report to clients); the Sentinels' (they talk TLS to the data nodes and to
each other) names `sentinel-1` to `sentinel-3`. A certificate that lacks a name it
should have (one made before a name was added here) is made anew. Redis's
ACL file holds hashes of the users' passwords (shared.security.redis_acl):
the two services', the replicas' (`replication`) and the Sentinels'
(`sentinel`). Secrets are written readable by their owner only. Redis
images run as users of their own (999 in redis:7, Debian's `redis` in a
stand-in), so Redis's and the Sentinels' folders go to a group instead,
which the compose file gives those containers (`group_add`), whatever their user.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

from cryptography import x509

from shared.security import auth
from shared.security.certs import CertificateAuthority, write_private
from shared.security.redis_acl import acl_file_text

CA_DAYS = 3650  # the CA and what it signs; renew by deleting files
# Each server's folder -> the host names its certificate names (beside localhost and 127.0.0.1).
SERVERS = {
    "trainer": ("trainer",),
    "infer": ("infer",),
    "redis": ("redis", "redis-replica"),  # the data nodes of docker-compose.ha.yml too
    "sentinel": ("sentinel-1", "sentinel-2", "sentinel-3"),
}
LOCAL_NAMES = ("localhost", "127.0.0.1")
# Redis ACL users whose password lives in the folder of the Redis process that logs in as it.
REDIS_PASSWORDS = {
    "trainer": "trainer/redis.password",
    "infer": "infer/redis.password",
    "replication": "redis/replication.password",
    "sentinel": "sentinel/redis.password",
}
CLIENT_TOKENS = {"admin": [auth.ADMIN], "predict": [auth.PREDICT]}


def make_secrets(root: Path, service_uid: int, redis_gid: int) -> list[str]:
    """Write what is missing under `root`; return what was made (paths relative to it)."""
    made: list[str] = []

    def absent(*paths: Path) -> bool:
        """Whether any of `paths` is missing (then all of them are made anew, and listed)."""
        if all(path.exists() for path in paths):
            return False
        made.extend(str(path.relative_to(root)) for path in paths)
        return True

    ca_cert, ca_key = root / "ca" / "ca.crt", root / "ca" / "ca.key"
    if absent(ca_cert, ca_key):
        ca = CertificateAuthority.new("tandem-stack-ca", days=CA_DAYS)
        ca.write_key(ca_key)
        ca.write(ca_cert)
    else:
        ca = CertificateAuthority.load(ca_cert, ca_key, days=CA_DAYS)
    if absent(root / "public" / "ca.crt"):
        ca.write(root / "public" / "ca.crt")

    for server, names in SERVERS.items():
        stem = root / server / "server"
        hosts = (*names, *LOCAL_NAMES)
        cert, key = stem.with_suffix(".crt"), stem.with_suffix(".key")
        if absent(cert, key) or _renamed(cert, hosts):
            if str(cert.relative_to(root)) not in made:
                made.extend(str(path.relative_to(root)) for path in (cert, key))
            ca.issue(server, hosts=hosts).write(stem)

    passwords = {}
    for user, relative in REDIS_PASSWORDS.items():
        path = root / relative
        if absent(path):
            write_private(path, secrets.token_urlsafe(32).encode())
        passwords[user] = path.read_text()
    # Made again every time from the password files: a renewed password is in force at once.
    write_private(root / "redis" / "users.acl", acl_file_text(passwords).encode())

    tokens = root / "public" / "tokens.json"
    for identity, roles in CLIENT_TOKENS.items():
        token_file = root / "clients" / f"{identity}.token"
        if absent(token_file):
            if tokens.exists():  # the lost token's hash must not stay valid
                auth.revoke(tokens, identity=identity)
            write_private(token_file, auth.issue(tokens, identity, roles).encode())
    tokens.chmod(0o644)  # hashes only: every service reads it

    for service in ("trainer", "infer"):
        _own(root / service, uid=service_uid, gid=service_uid, group_reads=False)
    for redis_process in ("redis", "sentinel"):
        _own(root / redis_process, uid=0, gid=redis_gid, group_reads=True)
    return made


def _renamed(cert_path: Path, hosts: tuple[str, ...]) -> bool:
    """Whether the certificate lacks one of `hosts` (or cannot be read): then it is made anew."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return True
    named = {str(name) for name in names.get_values_for_type(x509.DNSName)}
    named |= {str(address) for address in names.get_values_for_type(x509.IPAddress)}
    return not set(hosts) <= named


def _own(folder: Path, uid: int, gid: int, group_reads: bool) -> None:
    """Give a service's folder and files to its user or group (only root may; else they stay the caller's)."""
    if os.geteuid() != 0:
        return
    for path in (folder, *folder.iterdir()):
        os.chown(path, uid, gid)
        if group_reads:
            path.chmod(0o750 if path.is_dir() else 0o640)
        else:
            path.chmod(0o700 if path.is_dir() else 0o600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--service-uid", type=int, default=10001, help="the trainer's and inference's user")
    parser.add_argument("--redis-gid", type=int, default=10002, help="the group Redis reads its folder as")
    args = parser.parse_args(argv)
    made = make_secrets(args.directory, args.service_uid, args.redis_gid)
    print(
        f"deploy_secrets: {args.directory}: "
        + (f"made {', '.join(made)}" if made else "everything was there")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
