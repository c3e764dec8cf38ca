"""Who may call what: the roles tables, the check, and the gRPC interceptor both services install.

`METHOD_ROLES` names, for every gRPC method either server serves, the roles
that may call it (`admin` may call anything); `None` marks a method open to
anyone (health: probes carry no token). `HTTP_ROUTE_ROLES` does the same for
the inference service's HTTP routes (infer_svc.http). With auth on (a tokens
file, shared.security.auth), each call must prove who it is, by
`authorization: Bearer TOKEN` (gRPC metadata, or an HTTP header) or, with
mutual TLS, by a client certificate whose common name the file lists:

- no credentials, a malformed header, an unknown token or certificate:
  Unauthenticated (gRPC UNAUTHENTICATED, HTTP 401);
- a caller without a role the method needs, or a method the table does not
  know (a new RPC is refused until it is added here on purpose):
  Denied (gRPC PERMISSION_DENIED, HTTP 403).

`AccessCheck` decides, knowing nothing of either transport; `AccessInterceptor`
asks it for gRPC calls, infer_svc.http's middleware for HTTP requests.

Messages say why and never quote the token. Each refusal is counted
(`tandem_auth_failures_total{service,reason}`) and logged with the peer's
address, at most one line per peer host per `log_interval` seconds (the
next line says how many were held back), so a flood of bad calls cannot
flood the log. A call let through runs with its `Caller` as
`shared.security.auth.current_caller()`; with auth off, every call runs as
`UNRESTRICTED`. Which jobs and datasets a caller may touch is the domain's
business (trainer_svc.manager, trainer_svc.datasets), not this table's.

Server reflection follows `TANDEM_REFLECTION`: `on` (open; the default, for
development), `view` (behind the view role) or `off` (not served).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import grpc
from prometheus_client import Counter

from shared.env import env
from shared.security.auth import PREDICT, TRAIN, UNRESTRICTED, VIEW, Caller, TokensFile, iterate_as, run_as

log = logging.getLogger("tandem.access")

OPEN = None
READ_JOBS = frozenset({VIEW, TRAIN})  # train reads its own jobs; the domain filters (Caller.sees)
METHOD_ROLES: dict[str, frozenset[str] | None] = {
    "/grpc.health.v1.Health/Check": OPEN,
    "/grpc.health.v1.Health/Watch": OPEN,
    "/tandem.v1.Trainer/GetJob": READ_JOBS,
    "/tandem.v1.Trainer/ListJobs": READ_JOBS,
    "/tandem.v1.Trainer/WatchJob": READ_JOBS,
    "/tandem.v1.Trainer/ListCheckpoints": READ_JOBS,
    "/tandem.v1.Trainer/ListDatasets": READ_JOBS,
    "/tandem.v1.Trainer/StartJob": frozenset({TRAIN}),
    "/tandem.v1.Trainer/CancelJob": frozenset({TRAIN}),  # its own jobs: the domain checks
    "/tandem.v1.Trainer/UploadDataset": frozenset({TRAIN}),  # overwrites its own: the domain checks
    "/tandem.v1.Inference/Predict": frozenset({PREDICT}),
    "/tandem.v1.Inference/GetModelMetadata": frozenset({PREDICT}),
    "/tandem.v1.Inference/ListModels": frozenset({PREDICT}),
    "/inference.GRPCInferenceService/ServerLive": frozenset({PREDICT}),
    "/inference.GRPCInferenceService/ServerReady": frozenset({PREDICT}),
    "/inference.GRPCInferenceService/ModelReady": frozenset({PREDICT}),
    "/inference.GRPCInferenceService/ServerMetadata": frozenset({PREDICT}),
    "/inference.GRPCInferenceService/ModelMetadata": frozenset({PREDICT}),
    "/inference.GRPCInferenceService/ModelInfer": frozenset({PREDICT}),
}
# The Open Inference Protocol over HTTP (infer_svc.http): "METHOD /route" as aiohttp matches it.
# Health is open, as grpc.health.v1 is; the rest needs predict, as the gRPC OIP methods do.
HTTP_ROUTE_ROLES: dict[str, frozenset[str] | None] = {
    "GET /v2/health/live": OPEN,
    "GET /v2/health/ready": OPEN,
    "GET /v2": frozenset({PREDICT}),
    "GET /v2/models/{name}": frozenset({PREDICT}),
    "GET /v2/models/{name}/versions/{version}": frozenset({PREDICT}),
    "GET /v2/models/{name}/ready": frozenset({PREDICT}),
    "GET /v2/models/{name}/versions/{version}/ready": frozenset({PREDICT}),
    "POST /v2/models/{name}/infer": frozenset({PREDICT}),
    "POST /v2/models/{name}/versions/{version}/infer": frozenset({PREDICT}),
}
REFLECTION_METHOD = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
REFLECTION_ROLES = {"on": OPEN, "view": frozenset({VIEW})}  # "off": not served at all

FAILURES = Counter("tandem_auth_failures", "Calls refused by the access check", ["service", "reason"])


def reflection_mode(raw: str) -> str:
    if raw not in ("on", "off", "view"):
        raise ValueError("must be on, off or view")
    return raw


@dataclass(frozen=True)
class AccessSettings:
    tokens_file: str | None = None  # None: auth off
    reflection: str = "on"

    @classmethod
    def from_env(cls) -> AccessSettings:
        return cls(env("TANDEM_TOKENS_FILE", None), env("TANDEM_REFLECTION", "on", reflection_mode))

    @property
    def reflection_served(self) -> bool:
        return self.reflection != "off"


class Refused(Exception):
    """A call the access check turns away; `reason` labels it in tandem_auth_failures_total."""

    def __init__(self, reason: str, message: str, caller: Caller | None = None):
        super().__init__(message)
        self.reason, self.caller = reason, caller


class Unauthenticated(Refused):
    """No credentials, malformed ones, or ones not known here (gRPC UNAUTHENTICATED, HTTP 401)."""


class Denied(Refused):
    """A known caller without a role the method needs (gRPC PERMISSION_DENIED, HTTP 403)."""


class RefusalLog:
    """Whether to log a refusal from a peer: at most once per peer host per `interval` seconds.

    `admit` answers None (hold it back) or how many were held back since the
    last line. The port is not part of the key: a client that reconnects
    comes from another port. At most `max_peers` hosts are remembered.
    """

    def __init__(self, interval: float, clock=time.monotonic, max_peers: int = 1024):
        self.interval, self._clock, self._max_peers = interval, clock, max_peers
        self._peers: OrderedDict[str, list] = OrderedDict()  # host -> [last line at, held back]
        self._lock = threading.Lock()

    def admit(self, peer: str) -> int | None:
        host = peer.rpartition(":")[0] or peer  # "ipv4:127.0.0.1:5000" -> "ipv4:127.0.0.1"
        now = self._clock()
        with self._lock:
            seen = self._peers.get(host)
            if seen and now - seen[0] < self.interval:
                seen[1] += 1
                return None
            self._peers[host] = [now, 0]
            self._peers.move_to_end(host)
            while len(self._peers) > self._max_peers:
                self._peers.popitem(last=False)
            return seen[1] if seen else 0


class AccessCheck:
    """Who may call what on one server, whatever the transport: `admit` authenticates a call from
    its `authorization` values and its client certificate's common name, and authorizes it
    against `roles` (method or route -> roles; see the module docstring). `service` names the
    server in metrics and logs."""

    def __init__(
        self,
        settings: AccessSettings,
        service: str,
        roles: dict[str, frozenset[str] | None],
        log_interval: float = 60.0,
    ):
        self.tokens = TokensFile(settings.tokens_file) if settings.tokens_file else None
        self.roles, self.service = roles, service
        self._refusals = RefusalLog(log_interval)

    @property
    def on(self) -> bool:
        return self.tokens is not None

    def is_open(self, method: str) -> bool:
        """Whether anyone may call `method`, credentials or not (health)."""
        return method in self.roles and self.roles[method] is OPEN

    def admit(self, method: str, authorization: list[str], certificate_name: str | None, peer: str) -> Caller:
        """The caller, allowed to call `method`; else Refused (counted and logged) saying why.

        `authorization`: the call's authorization header (or metadata) values;
        `certificate_name`: its client certificate's common name, if it has one;
        `peer`: where it comes from, for the log.
        """
        if self.tokens is None:
            return UNRESTRICTED
        try:
            caller = self._authenticate(self.tokens, authorization, certificate_name)
            self._authorize(caller, method)
            return caller
        except Refused as refused:
            self._refused(refused, method, peer)
            raise

    def _authenticate(
        self, tokens: TokensFile, authorization: list[str], certificate_name: str | None
    ) -> Caller:
        if authorization:
            scheme, _, token = authorization[0].partition(" ")
            if len(authorization) > 1 or scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("malformed", "the authorization must be one 'Bearer TOKEN'")
            caller = tokens.by_token(token.strip())
            if caller is None:
                raise Unauthenticated(
                    "unknown_token",
                    "the bearer token is not known here (mistyped, revoked or another deployment's)",
                )
            return caller
        if certificate_name:
            caller = tokens.by_certificate(certificate_name)
            if caller is None:
                raise Unauthenticated(
                    "unknown_certificate",
                    f"no token, and the client certificate's common name {certificate_name[:64]!r} "
                    "is not in the tokens file",
                )
            return caller
        raise Unauthenticated(
            "no_credentials",
            "this server needs credentials: send 'authorization: Bearer TOKEN' "
            "(gRPC metadata or an HTTP header)",
        )

    def _authorize(self, caller: Caller, method: str) -> None:
        if method not in self.roles:
            raise Denied(
                "unlisted",
                f"{method} is not in the roles table (shared/security/access.py): no one may call it",
                caller,
            )
        needed = self.roles[method]
        if needed is OPEN:  # anyone may (the transports do not even ask)
            return
        if not any(caller.has(role) for role in needed):
            raise Denied(
                "role",
                f"{caller.identity!r} (roles: {', '.join(sorted(caller.roles))}) may not call "
                f"{method}: it needs the role {' or '.join(sorted(needed))}",
                caller,
            )

    def _refused(self, refused: Refused, method: str, peer: str) -> None:
        FAILURES.labels(self.service, refused.reason).inc()
        held_back = self._refusals.admit(peer)
        if held_back is not None:
            log.warning(
                "event=auth_refused service=%s peer=%s method=%s reason=%s identity=%s held_back=%d",
                self.service,
                peer,
                method,
                refused.reason,
                refused.caller.identity if refused.caller else "-",
                held_back,
            )


GRPC_STATUS_OF_REFUSAL = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    Denied: grpc.StatusCode.PERMISSION_DENIED,
}


def log_access(check: AccessCheck, settings: AccessSettings, transport: str) -> None:
    """Say at start how `check` guards `transport` ("grpc", "http")."""
    log.info(
        "event=access service=%s transport=%s auth=%s tokens_file=%s reflection=%s",
        check.service,
        transport,
        "on" if check.on else "off",
        settings.tokens_file or "-",
        settings.reflection,
    )


class AccessInterceptor(grpc.ServerInterceptor):
    """The access check (AccessCheck) of one gRPC server, on METHOD_ROLES and reflection."""

    def __init__(self, settings: AccessSettings, service: str, log_interval: float = 60.0):
        roles = {**METHOD_ROLES}
        if settings.reflection_served:
            roles[REFLECTION_METHOD] = REFLECTION_ROLES[settings.reflection]
        self.check = AccessCheck(settings, service, roles, log_interval)
        log_access(self.check, settings, "grpc")

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or self.check.is_open(details.method):
            return handler  # not served here (UNIMPLEMENTED, as without auth), or open to anyone
        return _with_caller(handler, lambda context: self._admit(details, context))

    def _admit(self, details, context) -> Caller:
        """The caller, allowed to call this method; else abort the call with the status that says why."""
        metadata = details.invocation_metadata or ()
        names = context.auth_context().get("x509_common_name")
        try:
            return self.check.admit(
                details.method,
                [value for key, value in metadata if key == "authorization"],
                names[0].decode(errors="replace") if names else None,
                context.peer(),
            )
        except Refused as refused:
            context.abort(GRPC_STATUS_OF_REFUSAL[type(refused)], str(refused))
            raise AssertionError("unreachable: grpc's context.abort raises") from None


def _with_caller(handler: grpc.RpcMethodHandler, admit) -> grpc.RpcMethodHandler:
    """`handler`, admitting each call first and running it with `current_caller()` set to its caller."""
    kind = "_".join(
        "stream" if streaming else "unary"
        for streaming in (handler.request_streaming, handler.response_streaming)
    )
    behaviour = getattr(handler, kind)  # e.g. handler.unary_stream

    def admitted(request, context):
        caller = admit(context)  # aborts a refused call before the handler sees its request
        return (iterate_as if handler.response_streaming else run_as)(caller, behaviour, request, context)

    return getattr(grpc, f"{kind}_rpc_method_handler")(
        admitted,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
