"""Who a caller is: the tokens file, the `Caller` it names, and the caller of the call being served.

The tokens file (`TANDEM_TOKENS_FILE`; unset = auth off) is JSON:

    {"tokens": [{"sha256": "<hex SHA-256 of the token>", "identity": "alice", "roles": ["train"]}],
     "certificates": [{"identity": "<a client certificate's common name>", "roles": ["predict"]}]}

It holds hashes only, so a copy of the file lets no one in. A token is
looked up by its SHA-256, compared with every entry's in constant time.
The file is read again when it changes (a stat per check), so tokens are
issued and revoked without a restart; a file that becomes unreadable or
invalid is logged and the last good table stays in force (never "no auth").
`certificates` lets a mutual-TLS client's certificate stand for an identity.

`python -m shared.security.auth issue --identity alice --roles train --file tokens.json`
prints a new token once and stores its hash; `revoke`, `certificate` and
`list` do the rest (`--help`).

The servicers learn who calls through `current_caller()`, which the access
interceptor (shared.security.access) sets around each handler; the domain gets that
`Caller` as a plain value and decides ownership with `sees` and `controls`.
"""

from __future__ import annotations

import argparse
import contextvars
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tandem.auth")

PREDICT, VIEW, TRAIN, ADMIN = "predict", "view", "train", "admin"
ROLES = (PREDICT, VIEW, TRAIN, ADMIN)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MAX_IDENTITY = 128


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: an identity and its roles ("" and every role when auth is off)."""

    identity: str
    roles: frozenset[str]

    def has(self, role: str) -> bool:
        return role in self.roles or ADMIN in self.roles

    def sees(self, owner: str) -> bool:
        """Whether this caller may read what `owner` made: its own, or anyone's with `view`."""
        return self.has(VIEW) or self.identity == owner

    def controls(self, owner: str) -> bool:
        """Whether this caller may change or replace what `owner` made: its own, or anyone's as admin."""
        return self.has(ADMIN) or self.identity == owner


class NotPermitted(Exception):
    """A caller reaching what is not its own (another's job or dataset): PERMISSION_DENIED."""


UNRESTRICTED = Caller("", frozenset(ROLES))  # auth off: the local demo, tests that do not ask for it

_current: contextvars.ContextVar[Caller] = contextvars.ContextVar("tandem_caller")


def current_caller() -> Caller:
    """The caller of the call this thread serves, as the access interceptor set it."""
    try:
        return _current.get()
    except LookupError:  # not a LookupError to the servicer: that would answer NOT_FOUND
        raise RuntimeError(
            "no caller: the handler runs without shared.security.access's interceptor"
        ) from None


def _context_of(caller: Caller) -> contextvars.Context:
    context = contextvars.copy_context()
    context.run(_current.set, caller)
    return context


def run_as(caller: Caller, function, *args):
    """`function(*args)` in a context of its own where `current_caller()` is `caller`."""
    return _context_of(caller).run(function, *args)


def iterate_as(caller: Caller, function, *args):
    """The items of the iterator `function(*args)` returns, each made where `current_caller()` is `caller`.

    A generator's body runs at each next(), not when it is called: every step
    runs in the caller's context, and so does the close that ends it early.
    """
    context = _context_of(caller)
    items = context.run(function, *args)
    try:
        while True:
            try:
                item = context.run(next, items)
            except StopIteration:
                return
            yield item
    finally:
        if hasattr(items, "close"):
            context.run(items.close)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ---------------------------------------------------------------- the file


class TokensFileError(ValueError):
    pass


@dataclass(frozen=True)
class _Table:
    tokens: tuple[tuple[bytes, Caller], ...]  # (SHA-256 digest, caller)
    certificates: dict[str, Caller]  # common name -> caller


def _entries(data: dict, section: str) -> list[dict]:
    entries = data.get(section, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise TokensFileError(f"{section} must be a list of objects")
    return entries


def _caller(entry: dict, where: str) -> Caller:
    identity, roles = entry.get("identity"), entry.get("roles")
    if not isinstance(identity, str) or not 0 < len(identity) <= MAX_IDENTITY:
        raise TokensFileError(f"{where}.identity must be a string of 1-{MAX_IDENTITY} characters")
    if not isinstance(roles, list) or not roles or not all(role in ROLES for role in roles):
        raise TokensFileError(f"{where}.roles must be a non-empty list of {', '.join(ROLES)}")
    return Caller(identity, frozenset(roles))


def parse_tokens_file(text: str) -> _Table:
    """The table a tokens file holds; TokensFileError naming the entry that is wrong."""
    try:
        data = json.loads(text)
    except ValueError as error:
        raise TokensFileError(f"not JSON: {error}") from None
    if not isinstance(data, dict) or set(data) - {"tokens", "certificates"}:
        raise TokensFileError('must be an object with "tokens" and "certificates" lists')
    tokens = []
    for i, entry in enumerate(_entries(data, "tokens")):
        digest = entry.get("sha256")
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
            raise TokensFileError(f"tokens[{i}].sha256 must be 64 lowercase hexadecimal digits")
        tokens.append((bytes.fromhex(digest), _caller(entry, f"tokens[{i}]")))
    certificates = {}
    for i, entry in enumerate(_entries(data, "certificates")):
        caller = _caller(entry, f"certificates[{i}]")
        certificates[caller.identity] = caller
    return _Table(tuple(tokens), certificates)


class TokensFile:
    """The tokens file at `path`, read again whenever it changes (see the module docstring).

    The first read must succeed: a service whose tokens file cannot be read does not start.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen = self._stat()
        self._table = parse_tokens_file(self.path.read_text())

    def _stat(self) -> tuple | None:
        try:
            s = os.stat(self.path)
        except OSError:
            return None
        return s.st_ino, s.st_size, s.st_mtime_ns

    def _fresh(self) -> _Table:
        seen = self._stat()
        if seen == self._seen:
            return self._table
        with self._lock:
            if seen != self._seen:
                self._seen = seen
                try:
                    self._table = parse_tokens_file(self.path.read_text())
                    log.info(
                        "event=tokens_reloaded file=%s tokens=%d certificates=%d",
                        self.path,
                        len(self._table.tokens),
                        len(self._table.certificates),
                    )
                except (OSError, UnicodeDecodeError, TokensFileError) as error:
                    log.error(
                        "event=tokens_file_invalid file=%s error=%r; the previous tokens stay in force",
                        self.path,
                        str(error),
                    )
            return self._table

    def by_token(self, token: str) -> Caller | None:
        """The caller a token names, or None. Every entry is compared, in constant time."""
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for stored, caller in self._fresh().tokens:
            if hmac.compare_digest(stored, digest):
                found = caller
        return found

    def by_certificate(self, common_name: str) -> Caller | None:
        return self._fresh().certificates.get(common_name)


# ---------------------------------------------------------------- issuing and revoking


def _read_for_edit(path: Path) -> dict:
    if not path.exists():
        return {"tokens": [], "certificates": []}
    text = path.read_text()
    parse_tokens_file(text)  # refuse to edit a file the services would refuse
    data = json.loads(text)
    return {"tokens": data.get("tokens", []), "certificates": data.get("certificates", [])}


def _write(path: Path, data: dict) -> None:
    """Replace the file at once (write and rename), readable by its owner only."""
    parse_tokens_file(json.dumps(data))
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", delete=False
    ) as temporary:
        json.dump(data, temporary, indent=2)
        temporary.write("\n")
    os.chmod(temporary.name, 0o600)
    os.replace(temporary.name, path)


def issue(path: str | os.PathLike, identity: str, roles: list[str]) -> str:
    """A new token for `identity` with `roles`; only its hash is written to the file at `path`."""
    path = Path(path)
    data = _read_for_edit(path)
    token = secrets.token_urlsafe(32)
    data["tokens"].append({"sha256": token_digest(token), "identity": identity, "roles": roles})
    _write(path, data)
    return token


def revoke(path: str | os.PathLike, identity: str | None = None, token: str | None = None) -> int:
    """Remove one token, or every token and certificate of `identity`; returns how many went."""
    path = Path(path)
    data = _read_for_edit(path)
    digest = token_digest(token) if token else None
    keep = [e for e in data["tokens"] if e["identity"] != identity and e["sha256"] != digest]
    certificates = [e for e in data["certificates"] if e["identity"] != identity]
    removed = len(data["tokens"]) - len(keep) + len(data["certificates"]) - len(certificates)
    _write(path, {"tokens": keep, "certificates": certificates})
    return removed


def allow_certificate(path: str | os.PathLike, common_name: str, roles: list[str]) -> None:
    """Let a client certificate with this common name stand for that identity, with `roles`."""
    path = Path(path)
    data = _read_for_edit(path)
    data["certificates"] = [e for e in data["certificates"] if e["identity"] != common_name]
    data["certificates"].append({"identity": common_name, "roles": roles})
    _write(path, data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shared.security.auth", description="Manage a tokens file."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    issuing = commands.add_parser("issue", help="print a new token once and store its hash")
    issuing.add_argument("--identity", required=True)
    revoking = commands.add_parser("revoke", help="remove a token, or everything of an identity")
    which = revoking.add_mutually_exclusive_group(required=True)
    which.add_argument("--identity")
    which.add_argument("--token", help="the token itself (read from stdin if '-')")
    certifying = commands.add_parser("certificate", help="map a client certificate's CN to roles")
    certifying.add_argument("--identity", required=True, help="the certificate's common name")
    listing = commands.add_parser("list", help="identities, roles and hash prefixes")
    for command in (issuing, certifying):
        command.add_argument("--roles", required=True, help=f"comma-separated: {', '.join(ROLES)}")
    for command in (issuing, revoking, certifying, listing):
        command.add_argument("--file", required=True, help="the tokens file (TANDEM_TOKENS_FILE)")
    args = parser.parse_args(argv)
    roles = [r.strip() for r in getattr(args, "roles", "").split(",") if r.strip()]
    try:
        if args.command == "issue":
            print(issue(args.file, args.identity, roles))
        elif args.command == "revoke":
            token = sys.stdin.readline().strip() if args.token == "-" else args.token
            print(f"removed {revoke(args.file, args.identity, token)} entries", file=sys.stderr)
        elif args.command == "certificate":
            allow_certificate(args.file, args.identity, roles)
        else:
            data = _read_for_edit(Path(args.file))
            for entry in data["tokens"]:
                print(f"token {entry['sha256'][:12]}… {entry['identity']} {','.join(entry['roles'])}")
            for entry in data["certificates"]:
                print(f"certificate {entry['identity']} {','.join(entry['roles'])}")
    except (OSError, TokensFileError) as error:
        print(f"python -m shared.security.auth: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
