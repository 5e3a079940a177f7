"""The least a middleware can do for a request it does not sample: a ruler, not a middleware.

Sampling that always keeps errors, and a request id echoed to the client, mean that a request
the sampler drops still has to:

- decide: draw a trace id (or read the caller's ``traceparent``) and compare it to the rate;
- make a non-sampled span current, so that the handler's LLM calls do not start traces of
  their own (and outbound calls tell the next service "not sampled");
- echo the request id, a fresh one when none came;
- see the status and any exception, and the time, to keep the request if it failed or was
  slow.

``FloorASGI`` and ``FloorWSGI`` do exactly that and nothing more: no header validation, no
route, no disconnect watch, no byte counts, no containment of their own errors, no context for
a streamed body, and nothing is exported even when a request fails. They run in the
benchmarks next to ``langfuse_mw``'s dropped request, so the distance to this floor (and the
floor's own distance to an excluded path) is measured on the same machine in the same run.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.context import Context
from opentelemetry.trace import DEFAULT_TRACE_STATE, NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY

from langfuse_mw.context import attach_otel, detach_otel
from langfuse_mw.headers import new_request_id

_getrandbits = random.getrandbits
_time_ns = time.time_ns
_NOT_SAMPLED = TraceFlags(0)
_LOW_64 = (1 << 64) - 1
SLOW_NS = 10 * 10**9


def _decide(request_id: str | None, traceparent: str | None, bound: int) -> tuple[str, Any, bool]:
    # (request id, context token, sampled): a dropped request's span context made current.
    if traceparent is not None and traceparent[-2:] in ("00", "01"):
        trace_id = int(traceparent[3:35], 16)
        sampled = traceparent[-1] == "1"
    else:
        trace_id = _getrandbits(128) or 1
        sampled = (trace_id & _LOW_64) < bound
    values = (trace_id, _getrandbits(64) or 1, False, _NOT_SAMPLED, DEFAULT_TRACE_STATE, True)
    span = NonRecordingSpan(tuple.__new__(SpanContext, values))
    token = attach_otel(Context({_SPAN_KEY: span}))
    return request_id or new_request_id(), token, sampled


class FloorASGI:
    """The dropped-request minimum around an ASGI app (every request is dropped: rate 0)."""

    def __init__(self, app: Any, rate: float = 0.0) -> None:
        self.app = app
        self.bound = round(rate * (_LOW_64 + 1))
        self.kept = 0  # requests it would have exported

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = traceparent = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")
            elif name == b"traceparent":
                traceparent = value.decode("latin-1")
        request_id, token, _ = _decide(request_id, traceparent, self.bound)
        echo = (b"x-request-id", request_id.encode())
        status = 500
        started = _time_ns()

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message["headers"], echo]}
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            status = 500
            raise
        finally:
            detach_otel(token)
            if status >= 500 or _time_ns() - started >= SLOW_NS:
                self.kept += 1


class FloorWSGI:
    """The dropped-request minimum around a WSGI app (every request is dropped: rate 0)."""

    def __init__(self, app: Callable[..., Iterable[bytes]], rate: float = 0.0) -> None:
        self.app = app
        self.bound = round(rate * (_LOW_64 + 1))
        self.kept = 0

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        request_id, token, _ = _decide(
            environ.get("HTTP_X_REQUEST_ID"), environ.get("HTTP_TRACEPARENT"), self.bound
        )
        status = 500
        started = _time_ns()

        def starting(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            nonlocal status
            status = int(line[:3])
            return start_response(line, [*headers, ("x-request-id", request_id)], exc_info)

        try:
            return self.app(environ, starting)
        except Exception:
            status = 500
            raise
        finally:
            detach_otel(token)
            if status >= 500 or _time_ns() - started >= SLOW_NS:
                self.kept += 1
