"""Domain errors to gRPC status codes, for servicers that only translate.

Each service lists which of its domain's errors mean which status (the
first match wins); `translate_errors(table)` decorates a servicer method,
unary or streaming, so that such an error aborts the call with that status
and the error's message. Any other exception is a bug, and gRPC answers it
with UNKNOWN.
"""

from __future__ import annotations

import functools
import inspect

import grpc

StatusTable = list[tuple[type[Exception], grpc.StatusCode]]


def translate_errors(table: StatusTable):
    """A decorator for servicer methods: abort with the status `table` gives the error raised."""
    kinds = tuple(kind for kind, _ in table)

    def abort(context, error: Exception):
        context.abort(next(code for kind, code in table if isinstance(error, kind)), str(error))

    def decorate(method):
        if inspect.isgeneratorfunction(method):  # a streaming response raises as it is iterated

            @functools.wraps(method)
            def stream(self, request, context):
                try:
                    yield from method(self, request, context)
                except kinds as error:
                    abort(context, error)

            return stream

        @functools.wraps(method)
        def unary(self, request, context):
            try:
                return method(self, request, context)
            except kinds as error:
                abort(context, error)

        return unary

    return decorate
