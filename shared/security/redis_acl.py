"""Write Redis's ACL file for Tandem: one user per service, each allowed only what it runs.

    python -m shared.security.redis_acl --trainer-password-file /run/secrets/redis_trainer \
        --infer-password-file /run/secrets/redis_infer --out /acl/users.acl

and start Redis with `--aclfile /acl/users.acl` (Redis 6.2 or later). The
compose stack makes it with its other secrets (shared.security.deploy_secrets). The file
holds SHA-256 hashes of the passwords (`#HEX`), never the passwords: each
service still reads its own from a file (`REDIS_PASSWORD_FILE`) and names its
user (`REDIS_USERNAME`, or `rediss://USER@host` in `REDIS_URL`).

The users:
- `trainer` reads and writes the `tandem:*` keys (checkpoints, jobs, their
  optimiser states, uploaded datasets) and announces on `tandem:*` channels;
- `infer` may only read the checkpoints and their metadata (`tandem:model:*`,
  `tandem:models`) and subscribe to the announcements channel: with its
  password leaked, the store cannot be changed (NOPERM), nor jobs read;
- `default` keeps its rights behind a password no one knows (see `acl_file_text`):
  a client without a user and password gets nothing.

Two more users exist only when their passwords are given, for the Redis that fails
over (docker-compose.ha.yml, docs/ha-compose.md):
- `replication`: what a replica runs on its primary (`masteruser`/`masterauth`):
  PSYNC, REPLCONF and PING, no keys;
- `sentinel`: what a Redis Sentinel runs on the data nodes (`sentinel auth-user`/
  `auth-pass`) to watch them and fail over: INFO, ROLE, PING, REPLICAOF and
  CONFIG REWRITE (in MULTI/EXEC), CLIENT SETNAME/KILL, SCRIPT KILL, and
  PUBLISH/SUBSCRIBE on the sentinels' `__sentinel__:*` channels; no keys.

The command lists are those the services' real flows run (tests/test_redis_security.py
runs a trainer job and an inference server with these users and finds no
denied command in Redis's ACL LOG); a new Redis command in the code needs adding here.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import sys
from pathlib import Path

from shared.env import read_secret_file

PREFIX = "tandem"
# Each user starts from nothing (off, no passwords, keys, channels or commands), whatever the
# server's defaults: `reset` clears the channels in Redis 7 but not in 6.2, hence `resetchannels`.
USERS = {
    "trainer": (
        f"~{PREFIX}:* &{PREFIX}:* "
        "+ping "
        "+get +set +del +exists +mget +scan "
        "+hget +hset +hdel +hgetall +hkeys +hmget +hstrlen "
        "+sadd +smembers +zadd +zrevrange +xadd +publish "
        "+zrange +zrem +incr +pexpire "  # the trainer pool's queue, fences and leases (trainer_svc.pool)
        "+xread +xrevrange "  # watching a job another trainer holds (trainer_svc.event_log)
        "+multi +exec +watch +unwatch "  # the publish, job and upload transactions
        "+evalsha +script|load "  # job_repository's and the pool's scripts (loaded on NOSCRIPT)
        "+wait"  # a publish waits for replicas (REDIS_MIN_REPLICAS_ACK); WAIT reads no key
    ),
    "infer": (
        f"~{PREFIX}:model:* ~{PREFIX}:models &{PREFIX}:announcements "
        "+ping +get +hgetall +hkeys +smembers +subscribe"
    ),
}
# The users of a Redis that fails over (primary, replicas, Sentinels): in the file only when
# their passwords are given. As Redis's replication and Sentinel documentation lists them.
OPTIONAL_USERS = {
    "replication": "+psync +replconf +ping",
    "sentinel": (
        "&__sentinel__:* "
        "+ping +info +role +multi +exec +slaveof +replicaof +config|rewrite "
        "+client|setname +client|kill +script|kill +publish +subscribe"
    ),
}


def password_hash(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def acl_file_text(passwords: dict[str, str]) -> str:
    """The ACL file for `passwords` (user -> password): one for each of USERS, and for any
    of OPTIONAL_USERS that should exist."""
    if not set(USERS) <= set(passwords) <= set(USERS) | set(OPTIONAL_USERS):
        raise ValueError(
            f"need a password for each of {sorted(USERS)} (and may have one for "
            f"{', '.join(sorted(OPTIONAL_USERS))}), got {sorted(passwords)}"
        )
    rules = {**USERS, **OPTIONAL_USERS}
    # `default` cannot simply be off: Redis (7.x, before redis/redis#14545) replays the append-only
    # file as the default user and re-checks ACLs at each EXEC, so with `default` off every
    # MULTI/EXEC (every checkpoint publish) is dropped when Redis restarts: silent data loss. So
    # it keeps every right, behind a password nobody ever sees (random, never stored): no client
    # can log in as it, and a connection without credentials still gets NOAUTH.
    unusable = secrets.token_urlsafe(32)
    lines = [f"user default reset resetchannels on #{password_hash(unusable)} ~* &* +@all"]
    lines += [
        f"user {user} reset resetchannels on #{password_hash(passwords[user])} {rules[user]}"
        for user in rules
        if user in passwords
    ]
    return "\n".join(lines) + "\n"


def write_acl_file(path: Path, password_files: dict[str, Path]) -> Path:
    """Write the ACL file for the passwords in `password_files` (user -> file), readable by its owner only."""
    text = acl_file_text(
        {user: read_secret_file(file, f"{user}'s password file") for user, file in password_files.items()}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as acl:
        acl.write(text)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for user in (*USERS, *OPTIONAL_USERS):
        parser.add_argument(
            f"--{user}-password-file",
            type=Path,
            required=user in USERS,
            help=f"a file holding the {user} user's password"
            + ("" if user in USERS else " (the user exists only with one)"),
        )
    parser.add_argument("--out", type=Path, required=True, help="where to write the ACL file")
    args = parser.parse_args(argv)
    try:
        files = {user: getattr(args, f"{user}_password_file") for user in (*USERS, *OPTIONAL_USERS)}
        users = [user for user, file in files.items() if file is not None]
        write_acl_file(args.out, {user: files[user] for user in users})
    except (OSError, ValueError) as error:
        parser.exit(2, f"redis_acl: {error}\n")
    print(f"redis_acl: wrote {args.out} (users: default locked, {', '.join(users)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
