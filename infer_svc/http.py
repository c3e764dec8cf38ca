"""The Open Inference Protocol (KServe v2) over HTTP/REST: the inference service's second port.

Triton serves the protocol on two ports, HTTP (8000) and gRPC (8001);
INFER_HTTP_LISTEN (default 127.0.0.1:8000, "off" for none) opens the HTTP one
beside INFER_LISTEN, with the same predictor, batcher, access check
(HTTP_ROUTE_ROLES: health open, everything else needs predict), TLS files and
request metrics (protocol="http"). Routes:

    GET  /v2                                   server metadata
    GET  /v2/health/live, /v2/health/ready     200, or 503 when not ready
    GET  /v2/models/{name}[/versions/{v}]      model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready
    POST /v2/models/{name}[/versions/{v}]/infer  (bodies: infer_svc.http_tensors)

Translation only: what each call checks and answers is infer_svc.oip's, as on
gRPC. Errors are {"error": message}, Triton's and KServe's shape, with the
status of the domain error's gRPC code (STATUS_BY_ERROR) through HTTP_STATUS;
a body over INFER_MAX_MESSAGE_BYTES is 413 from its Content-Length, before it
is read (and while it is read, for a chunked or compressed one).

Threads: aiohttp serves on an event loop in a thread of its own; what may
block (the predictor, the registry's reads of Redis, a large body's JSON)
runs in a pool of INFER_GRPC_WORKERS threads. As on gRPC (grpc_server's
maximum_concurrent_rpcs) at most 4 requests per thread are in hand at once;
beyond, 429 at once rather than an unbounded queue. Health is not counted: it
is answered from memory on the loop, so that probes see the truth under load.

Stop: from the start of the server's graceful stop, ready answers 503 and
any call but health 503; calls in flight finish within the grace period;
then the listener closes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from aiohttp import web

from infer_svc import oip
from infer_svc.config import InferConfig
from infer_svc.http_tensors import HEADER_LENGTH, infer_response, read_infer_request
from infer_svc.metrics import observed_request
from infer_svc.predict import Predictor
from infer_svc.servicer import STATUS_BY_ERROR
from shared.limits import LimitExceeded, check_limit
from shared.rpc.health_listener import bind_tcp
from shared.security.access import (
    GRPC_STATUS_OF_REFUSAL,
    HTTP_ROUTE_ROLES,
    AccessCheck,
    Unauthenticated,
    log_access,
)
from shared.security.tls import warn_if_plaintext_on_network

log = logging.getLogger("tandem.infer.http")
SETTING = "INFER_HTTP_LISTEN"
ACCEPTED_ENCODINGS = ("identity", "gzip", "deflate")  # aiohttp decompresses gzip and deflate as it reads
READ_CHUNK = 2**16
JSON = "application/json"
ROUTES = (
    "/v2, /v2/health/live, /v2/health/ready, /v2/models/NAME[/versions/VERSION], and there /ready and /infer"
)


class Refusal(Exception):
    """A request refused for what only HTTP has (its encoding, the requests in hand, the stop)."""

    def __init__(self, status: int, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.status, self.code = status, code


# gRPC's codes as HTTP statuses: the one vocabulary of both (in metrics too) is gRPC's.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}
ERRORS: list[tuple[type[Exception], grpc.StatusCode, int]] = [  # the first match wins
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED, 413),  # as gRPC answers a message too large
    *((kind, code, HTTP_STATUS[code]) for kind, code in STATUS_BY_ERROR),
    *((kind, code, HTTP_STATUS[code]) for kind, code in GRPC_STATUS_OF_REFUSAL.items()),
]


def status_of(error: Exception) -> tuple[grpc.StatusCode, int] | None:
    """The gRPC code and HTTP status that answer `error`; None for an error that is a bug."""
    if isinstance(error, Refusal):
        return error.code, error.status
    return next(((code, status) for kind, code, status in ERRORS if isinstance(error, kind)), None)


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def route_key(request: web.Request) -> str:
    """The request's route as HTTP_ROUTE_ROLES names it: "POST /v2/models/{name}/infer"; "" for
    a path not served here."""
    resource = request.match_info.route.resource
    return f"{request.method} {resource.canonical}" if resource is not None else ""


def certificate_common_name(request: web.Request) -> str | None:
    """The common name of the client's certificate (mutual TLS), if it sent one."""
    certificate = request.transport.get_extra_info("peercert") if request.transport else None
    for relative_name in (certificate or {}).get("subject", ()):
        for key, value in relative_name:
            if key == "commonName":
                return value
    return None


def listening_socket(address: str, shares_port: bool) -> socket.socket:
    """A TCP socket listening on `address`. `shares_port`: other worker processes of this program
    listen on it too (SO_REUSEPORT, infer_svc.workers); otherwise a port another program holds
    is refused here, at start, as gRPC's is (shared.rpc.server.grpc_server)."""
    try:
        listener = bind_tcp(address, reuse_port=shares_port)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{SETTING}={address!r}: cannot listen there (the port is in use, or the host is not "
            f"an address of this machine): {getattr(error, 'strerror', None) or error}"
        ) from None
    listener.listen(1024)
    listener.setblocking(False)
    return listener


class HttpListener:
    """The HTTP/REST port of one InferenceServer: bound now, served from `start`, closed by `stop`."""

    def __init__(self, config: InferConfig, predictor: Predictor, shares_port: bool = False):
        assert config.http_listen is not None
        self.address, self.config = config.http_listen, config
        self.predictor, self.registry = predictor, predictor.registry
        self.access = AccessCheck(config.auth, "inference", HTTP_ROUTE_ROLES)
        log_access(self.access, config.auth, "http")
        if config.tls is None:
            warn_if_plaintext_on_network(self.address, "HTTP")
        self._ssl = config.tls.ssl_context() if config.tls else None
        self._socket = listening_socket(self.address, shares_port)
        self.port: int = self._socket.getsockname()[1]
        self.max_in_hand = config.grpc_workers * 4
        self._in_hand = 0
        self._idle = asyncio.Event()  # set while nothing is in hand; awaited on the loop by _stop
        self._idle.set()
        self._stopping = False
        self._pool = ThreadPoolExecutor(max_workers=config.grpc_workers, thread_name_prefix="http")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-loop", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def scheme(self) -> str:
        return "https" if self._ssl else "http"

    # ------------------------------------------------------------ start and stop

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()
        log.info(
            "event=http_listener_started listen=%s port=%d scheme=%s", self.address, self.port, self.scheme
        )

    async def _start(self) -> None:
        # shutdown_timeout 0: by cleanup, `stop` has waited for the calls in flight already.
        self._runner = web.AppRunner(
            self.application(), access_log=None, handle_signals=False, shutdown_timeout=0
        )
        await self._runner.setup()
        await web.SockSite(self._runner, self._socket, ssl_context=self._ssl).start()

    def begin_stop(self) -> None:
        """From now on: ready is 503, and so is any new call but health."""
        self._stopping = True

    def stop(self, grace: float) -> None:
        """Let the calls in flight finish, within `grace` seconds; then close the port."""
        self.begin_stop()
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(grace), self._loop).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._socket.close()

    async def _stop(self, grace: float) -> None:
        if not self._idle.is_set():
            try:
                await asyncio.wait_for(self._idle.wait(), timeout=max(grace, 0.0))
            except TimeoutError:
                log.warning("event=http_stop_grace_over in_hand=%d: closing them", self._in_hand)
        if self._runner is not None:
            await self._runner.cleanup()

    # ------------------------------------------------------------ the application

    def application(self) -> web.Application:
        app = web.Application(
            middlewares=[self._errors_as_json, self._in_hand_limit, self._access],
            client_max_size=self.config.max_message_bytes,
        )
        for version in ("", "/versions/{version}"):
            model = "/v2/models/{name}" + version
            app.router.add_get(model, self.model_metadata, allow_head=False)
            app.router.add_get(model + "/ready", self.model_ready, allow_head=False)
            app.router.add_post(model + "/infer", self.infer)
        app.router.add_get("/v2", self.server_metadata, allow_head=False)
        app.router.add_get("/v2/health/live", self.live, allow_head=False)
        app.router.add_get("/v2/health/ready", self.ready, allow_head=False)
        return app

    @web.middleware
    async def _errors_as_json(self, request: web.Request, handler) -> web.StreamResponse:
        """Every refusal as {"error": message}: the domain's, ours, and aiohttp's own (404, 405)."""
        try:
            return await handler(request)
        except web.HTTPMethodNotAllowed as error:
            allowed = ", ".join(sorted(error.allowed_methods))
            response = error_response(
                405, f"{request.method} is not served at {request.path:.200}; use {allowed}"
            )
            response.headers["Allow"] = allowed
            return response
        except web.HTTPNotFound:
            return error_response(404, f"no route {request.path:.200}: the routes are {ROUTES}")
        except web.HTTPException as error:  # aiohttp's own refusals (a malformed request): its words
            if error.status < 400:
                raise
            return error_response(error.status, error.text or error.reason)
        except Exception as error:
            answer = status_of(error)
            if answer is None:
                raise  # a bug: aiohttp logs it and answers 500
            response = error_response(answer[1], str(error))
            if isinstance(error, Unauthenticated):
                response.headers["WWW-Authenticate"] = "Bearer"
            if isinstance(error, LimitExceeded):
                response.force_close()  # the rest of the body is never read
            return response

    @web.middleware
    async def _in_hand_limit(self, request: web.Request, handler) -> web.StreamResponse:
        if self.access.is_open(route_key(request)):  # health: answered from memory, and always
            return await handler(request)
        if self._stopping:
            raise Refusal(503, grpc.StatusCode.UNAVAILABLE, "the server is stopping; call another replica")
        if self._in_hand >= self.max_in_hand:
            raise Refusal(
                429,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.max_in_hand} requests are in hand already (4 per INFER_GRPC_WORKERS "
                "thread); retry later",
            )
        self._in_hand += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self._in_hand -= 1
            if not self._in_hand:
                self._idle.set()

    @web.middleware
    async def _access(self, request: web.Request, handler) -> web.StreamResponse:
        if request.match_info.http_exception is not None:  # not served here: 404 or 405, as without auth
            raise request.match_info.http_exception
        route = route_key(request)
        if not self.access.is_open(route):
            peer = request.transport.get_extra_info("peername") if request.transport else None
            self.access.admit(
                route,
                request.headers.getall("Authorization", []),
                certificate_common_name(request),
                f"http:{peer[0]}:{peer[1]}" if peer else "http:unknown",
            )
        return await handler(request)

    async def _blocking(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    # ------------------------------------------------------------ handlers

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.registry.ready and not self._stopping
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(dataclasses.asdict(oip.server_metadata()))

    async def model_metadata(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        model = await self._blocking(oip.model_metadata, self.registry, name, version)
        return web.json_response(dataclasses.asdict(model))

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        ready = await self._blocking(oip.model_ready, self.registry, name, version)
        return web.json_response({"name": name, "ready": ready}, status=200 if ready else 503)

    async def infer(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        with observed_request("http", "ModelInfer", self.registry) as observation:
            observation.model_name = name
            try:
                body = await self._body(request)
                answer, content, json_length = await self._blocking(
                    self._answer, name, version, body, request.headers.get(HEADER_LENGTH)
                )
            except Exception as error:
                answered = status_of(error)
                observation.status = answered[0].name if answered else grpc.StatusCode.UNKNOWN.name
                raise
            observation.version, observation.status = answer.model_version, grpc.StatusCode.OK.name
        if json_length is None:
            return web.Response(body=content, content_type=JSON)
        return web.Response(
            body=content, content_type="application/octet-stream", headers={HEADER_LENGTH: str(json_length)}
        )

    def _answer(self, name: str, version: str, body: bytes, header_length: str | None):
        """(the answer, the response body, its JSON's length if binary outputs follow), off the loop."""
        infer_request = read_infer_request(body, header_length)
        answer = oip.infer(self.predictor, name, version, infer_request.inputs, infer_request.outputs)
        return (answer, *infer_response(answer, infer_request))

    async def _body(self, request: web.Request) -> bytes:
        """The request's body, decompressed, once it is known to be within INFER_MAX_MESSAGE_BYTES:
        from its Content-Length before a byte is read, and as it is read."""
        limit = self.config.max_message_bytes
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ACCEPTED_ENCODINGS:
            raise Refusal(
                415,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Content-Encoding {encoding!r:.40} is not accepted; send {', '.join(ACCEPTED_ENCODINGS)}",
            )
        if request.content_length is not None:
            check_limit("the request body", request.content_length, limit, "INFER_MAX_MESSAGE_BYTES", "bytes")
        chunks, size = [], 0
        try:
            while chunk := await request.content.read(READ_CHUNK):
                size += len(chunk)
                check_limit("the request body (read so far)", size, limit, "INFER_MAX_MESSAGE_BYTES", "bytes")
                chunks.append(chunk)
        except web.RequestPayloadError:  # aiohttp could not decompress or de-chunk what came
            if encoding == "identity":
                raise ValueError(
                    "the request body cannot be read: its chunked framing is malformed"
                ) from None
            raise ValueError(f"the request body is not valid {encoding} data") from None
        return b"".join(chunks)
