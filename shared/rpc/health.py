"""grpc.health.v1 for both servers, written so that no caller can freeze a server.

We do not use grpcio-health-checking's HealthServicer: its Watch sends while
holding the servicer's lock, and the close callback it registers takes that
lock on gRPC's polling thread, so a few clients that open Watch and cancel
deadlock the whole server (every RPC times out, SIGTERM no longer stops it).
Here the lock guards only the statuses and is never held while sending; each
Watch is a plain generator on a worker thread, and nothing of ours runs on
the polling thread.

Each open Watch holds one of the server's worker threads, so at most
`max_watchers` are open at once (`HealthServicer.for_workers`: a quarter of
the workers); one more is refused with RESOURCE_EXHAUSTED.

A process may serve its statuses on a second server too (the plaintext
listener for probes, shared.rpc.health_listener): `serving_elsewhere` gives
that server a servicer of its own that answers from the same statuses, so
the two never disagree, and counts its own watches against its own threads,
so watches on one server cannot take the other's.

`LIVENESS` is the entry a liveness probe asks for: GrpcService sets it
SERVING once the process serves, and only a shutdown ends that. "" and the
service names mean ready, which an inference server is not until its models
serve: a liveness probe on those would restart a fresh deployment for ever.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from functools import partial
from typing import TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.limits import LimitExceeded, check_limit
from shared.rpc.errors import translate_errors

Status: TypeAlias = health_pb2.HealthCheckResponse.ServingStatus
WORKERS_PER_WATCHER = 4
# How often an idle Watch checks that its client is still there: a cancelled
# watch gives its thread and its slot back within this many seconds.
CLIENT_CHECK_SECONDS = 0.5
SHOWN_NAME = 200  # characters of an unknown service's name quoted back
LIVENESS = "liveness"  # SERVING while the process is up and not shutting down


class UnknownService(LookupError):
    """A Check for a service that has no status here."""


STATUS_BY_ERROR = [
    (UnknownService, grpc.StatusCode.NOT_FOUND),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
]


class _Statuses:
    """What every servicer of one process answers: statuses by service name, and whether a
    graceful shutdown has begun. `changed` guards both (and each servicer's watch count) and
    is notified on every change."""

    def __init__(self):
        self.changed = threading.Condition()
        self.by_service: dict[str, Status] = {}
        self.shutting_down = False


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Serving statuses by service name ("" = the server as a whole), for Check and Watch."""

    def __init__(self, max_watchers: int, limit_variable: str, statuses: _Statuses | None = None):
        self._max_watchers = max_watchers
        self._limit_variable = limit_variable  # what sets max_watchers, for the refusal's message
        self._shared = statuses or _Statuses()
        self._changed = self._shared.changed
        self._watchers = 0  # this servicer's open watches, under self._changed

    @classmethod
    def for_workers(
        cls, workers: int, workers_variable: str, statuses: _Statuses | None = None
    ) -> HealthServicer:
        """For a server on `workers` threads (set by `workers_variable`): watches take a quarter at most."""
        limit = max(1, workers // WORKERS_PER_WATCHER)
        return cls(limit, f"{workers_variable} / {WORKERS_PER_WATCHER}", statuses)

    def serving_elsewhere(self, workers: int, workers_variable: str) -> HealthServicer:
        """A servicer for another server of this process, on `workers` threads: the same
        statuses (a change shows on both), watch places of its own (a quarter of its workers)."""
        return self.for_workers(workers, workers_variable, self._shared)

    def set(self, service: str, status: Status) -> None:
        """Set `service`'s status; ignored once a graceful shutdown has begun."""
        with self._changed:
            if not self._shared.shutting_down:
                self._shared.by_service[service] = status
                self._changed.notify_all()

    def enter_graceful_shutdown(self) -> None:
        """Every status NOT_SERVING for good; open watches get it and end (on every server)."""
        with self._changed:
            statuses = self._shared.by_service
            statuses.update(dict.fromkeys(statuses, health_pb2.HealthCheckResponse.NOT_SERVING))
            self._shared.shutting_down = True
            self._changed.notify_all()

    @translate_errors(STATUS_BY_ERROR)
    def Check(self, request, context):
        with self._changed:
            status = self._shared.by_service.get(request.service)
            known = sorted(self._shared.by_service)
        if status is None:
            # At most SHOWN_NAME characters of the name: the message travels in the trailers,
            # which a long name would take beyond the client's metadata limit.
            name = request.service[:SHOWN_NAME] + ("..." if len(request.service) > SHOWN_NAME else "")
            raise UnknownService(
                f"HealthCheckRequest.service {name!r} is unknown here; expected one of {known}"
            )
        return health_pb2.HealthCheckResponse(status=status)

    @translate_errors(STATUS_BY_ERROR)
    def Watch(self, request, context):
        """The current status at once (SERVICE_UNKNOWN for an unknown service), then each change.

        Ends when the client goes away or a graceful shutdown begins.
        """
        with self._watch_slot():
            sent = None
            while context.is_active():
                with self._changed:  # wait releases the lock; it is not held while we yield
                    self._changed.wait_for(
                        partial(self._has_news, request.service, sent), timeout=CLIENT_CHECK_SECONDS
                    )
                    status, ending = self._status(request.service), self._shared.shutting_down
                if status != sent:
                    yield health_pb2.HealthCheckResponse(status=status)
                    sent = status
                if ending:
                    return

    @contextmanager
    def _watch_slot(self):
        """One of the `max_watchers` places, for the duration of a Watch, or LimitExceeded."""
        with self._changed:
            check_limit("open health watches", self._watchers + 1, self._max_watchers, self._limit_variable)
            self._watchers += 1
        try:
            yield
        finally:
            with self._changed:
                self._watchers -= 1

    def _has_news(self, service: str, sent: Status | None) -> bool:
        """Under the lock: whether a Watch of `service` that last sent `sent` has more to say."""
        return self._status(service) != sent or self._shared.shutting_down

    def _status(self, service: str) -> Status:
        """Under the lock: `service`'s status, SERVICE_UNKNOWN if it has none."""
        return self._shared.by_service.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
