"""Settings of the service processes: environment variables (documented in the README), the
secret files they name, and the cores a default may count on."""

from __future__ import annotations

import math
import os
from pathlib import Path


def env(name: str, default, kind=str):
    """The variable `name` parsed by `kind` (str, int, float, bool or a parser), else `default`.

    Unset and empty mean the default. A value `kind` cannot parse is a
    ValueError naming the variable, so a misconfigured service stops at start.
    """
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    parse = _flag if kind is bool else kind
    try:
        return parse(raw)
    except ValueError as error:
        raise ValueError(f"{name}={raw!r}: {error}") from None


def _flag(raw: str) -> bool:
    if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError("must be true or false")
    return raw.lower() in ("1", "true", "yes")


def read_secret_file(path: Path, what: str) -> str:
    """A password kept in a file, as Docker secrets are: its text without one trailing newline.

    An empty one is a ValueError naming `what`: it would mean no password at all.
    """
    secret = path.read_text().removesuffix("\n").removesuffix("\r")
    if not secret:
        raise ValueError(f"{what}: the file is empty")
    return secret


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity), capped by its cgroup's CPU quota
    (a container's --cpus, a pod's CPU limit), rounded up: what INFER_WORKERS defaults to."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 limit here
        pass
    return cores
