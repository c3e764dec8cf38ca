"""Requests whose bytes do not parse as the method's message: INVALID_ARGUMENT, answered by us.

Left to grpcio, bytes that do not parse are answered INTERNAL ("Exception
deserializing request!"), and for a bidirectional stream whose first
message does not parse (server reflection's ServerReflectionInfo) grpcio
(1.81) can leave the call half-open: a few such calls and `server.stop()`
never completes, so SIGTERM no longer stops the server. This interceptor,
installed on both servers, gives every method a deserializer that cannot
fail: it hands the handler's wrapper an `_Unparsable` marker instead of
raising, and the wrapper aborts the call with INVALID_ARGUMENT before the
handler sees it (for a streamed request, when that message is reached).
"""

from __future__ import annotations

import grpc


class _Unparsable:
    """What a message that does not parse becomes: the reason, for the caller's status."""

    def __init__(self, error: Exception):
        self.error = error


class UnparsableRequests(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        parse = handler.request_deserializer

        def parse_or_mark(raw: bytes):
            try:
                return parse(raw)
            except Exception as error:  # noqa: BLE001 - whatever the parser raises, the bytes are bad
                return _Unparsable(error)

        def check(request, context):
            if isinstance(request, _Unparsable):
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request is not a valid message for {method}: "
                    f"{type(request.error).__name__}: {str(request.error)[:200]}",
                )
            return request

        def checked_stream(requests, context):
            for request in requests:
                yield check(request, context)

        if handler.request_streaming:
            behaviour = handler.stream_stream if handler.response_streaming else handler.stream_unary
            wrapped = lambda requests, context: behaviour(checked_stream(requests, context), context)  # noqa: E731
            field = "stream_stream" if handler.response_streaming else "stream_unary"
        else:
            behaviour = handler.unary_stream if handler.response_streaming else handler.unary_unary
            wrapped = lambda request, context: behaviour(check(request, context), context)  # noqa: E731
            field = "unary_stream" if handler.response_streaming else "unary_unary"
        return handler._replace(request_deserializer=parse_or_mark, **{field: wrapped})
