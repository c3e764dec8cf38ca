"""Who may call what: the one roles table, and the server interceptor both services install.

`METHOD_ROLES` names, for every method either server serves, the roles that
may call it (`admin` may call anything); `None` marks a method open to
anyone (health: probes carry no token). With auth on (a tokens file,
shared.security.auth), each call must prove who it is, by `authorization: Bearer
TOKEN` metadata or, with mutual TLS, by a client certificate whose common
name the file lists:

- no credentials, a malformed header, an unknown token or certificate:
  UNAUTHENTICATED;
- a caller without a role the method needs, or a method the table does not
  know (a new RPC is refused until it is added here on purpose):
  PERMISSION_DENIED.

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
    def __init__(self, code: grpc.StatusCode, reason: str, message: str, caller: Caller | None = None):
        super().__init__(message)
        self.code, self.reason, self.caller = code, reason, caller


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


class AccessInterceptor(grpc.ServerInterceptor):
    """The access check of one server (`service` names it in metrics and logs); see the module docstring."""

    def __init__(self, settings: AccessSettings, service: str, log_interval: float = 60.0):
        self.tokens = TokensFile(settings.tokens_file) if settings.tokens_file else None
        self.roles = {**METHOD_ROLES}
        if settings.reflection_served:
            self.roles[REFLECTION_METHOD] = REFLECTION_ROLES[settings.reflection]
        self.service = service
        self._refusals = RefusalLog(log_interval)
        log.info(
            "event=access service=%s auth=%s tokens_file=%s reflection=%s",
            service,
            "on" if self.tokens else "off",
            settings.tokens_file or "-",
            settings.reflection,
        )

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or (details.method in self.roles and self.roles[details.method] is OPEN):
            return handler  # not served here (UNIMPLEMENTED, as without auth), or open to anyone
        return _with_caller(handler, lambda context: self._admit(details, context))

    def _admit(self, details, context) -> Caller:
        """The caller, allowed to call this method; else abort the call with the status that says why."""
        tokens = self.tokens
        if tokens is None:
            return UNRESTRICTED
        try:
            caller = self._authenticate(tokens, details.invocation_metadata or (), context)
            self._authorize(caller, details.method)
            return caller
        except Refused as refused:
            self._refused(refused, details.method, context)
            context.abort(refused.code, str(refused))
            raise AssertionError("unreachable: grpc's context.abort raises") from None

    def _authenticate(self, tokens: TokensFile, metadata, context) -> Caller:
        headers = [value for key, value in metadata if key == "authorization"]
        if headers:
            scheme, _, token = headers[0].partition(" ")
            if len(headers) > 1 or scheme.lower() != "bearer" or not token.strip():
                raise Refused(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "malformed",
                    "the authorization metadata must be one 'Bearer TOKEN'",
                )
            caller = tokens.by_token(token.strip())
            if caller is None:
                raise Refused(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "unknown_token",
                    "the bearer token is not known here (mistyped, revoked or another deployment's)",
                )
            return caller
        names = context.auth_context().get("x509_common_name")
        if names:
            name = names[0].decode(errors="replace")
            caller = tokens.by_certificate(name)
            if caller is None:
                raise Refused(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "unknown_certificate",
                    f"no token, and the client certificate's common name {name[:64]!r} "
                    "is not in the tokens file",
                )
            return caller
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED,
            "no_credentials",
            "this server needs credentials: send the metadata 'authorization: Bearer TOKEN'",
        )

    def _authorize(self, caller: Caller, method: str) -> None:
        if method not in self.roles:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                "unlisted",
                f"{method} is not in the roles table (shared/security/access.py): no one may call it",
                caller,
            )
        needed = self.roles[method]
        if needed is OPEN:  # anyone may (intercept_service does not even ask)
            return
        if not any(caller.has(role) for role in needed):
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                "role",
                f"{caller.identity!r} (roles: {', '.join(sorted(caller.roles))}) may not call "
                f"{method}: it needs the role {' or '.join(sorted(needed))}",
                caller,
            )

    def _refused(self, refused: Refused, method: str, context) -> None:
        FAILURES.labels(self.service, refused.reason).inc()
        peer = context.peer()
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
