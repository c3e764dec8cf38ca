"""Domain errors to gRPC status codes, for servicers that only translate.

Each service lists which of its domain's errors mean which status (the
first match wins); `translate_errors(table)` decorates a servicer method,
unary or streaming, so that such an error aborts the call with that status
and the error's message. Any other exception is a bug, and gRPC answers it
with UNKNOWN. A servicer that cannot answer at all for a while (the trainer
before it has reached its Redis) says so through the same table: `check`
runs before each call and raises one of its errors.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import grpc

StatusTable = list[tuple[type[Exception], grpc.StatusCode]]


def translate_errors(table: StatusTable, check: Callable[[Any], None] | None = None):
    """A decorator for servicer methods: abort with the status `table` gives the error raised.

    `check(servicer)`, if given, runs first in every call; what it raises is translated too.
    """
    kinds = tuple(kind for kind, _ in table)
    first = check or (lambda servicer: None)

    def abort(context, error: Exception):
        context.abort(next(code for kind, code in table if isinstance(error, kind)), str(error))

    def decorate(method):
        if inspect.isgeneratorfunction(method):  # a streaming response raises as it is iterated

            @functools.wraps(method)
            def stream(self, request, context):
                try:
                    first(self)
                    yield from method(self, request, context)
                except kinds as error:
                    abort(context, error)

            return stream

        @functools.wraps(method)
        def unary(self, request, context):
            try:
                first(self)
                return method(self, request, context)
            except kinds as error:
                abort(context, error)

        return unary

    return decorate
