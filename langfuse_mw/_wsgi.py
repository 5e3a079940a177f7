"""WSGI pieces shared by the WSGI middleware, the Flask extension and the Django middleware."""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

from ._failsafe import report
from .context import _current as _request_var
from .context import attach_otel, detach_otel
from .core import RequestInfo, RequestState, RequestTracer

__all__ = [
    "ENVIRON_KEY",
    "HEALTH_HEADERS",
    "Environ",
    "ExcInfo",
    "ResponseBody",
    "StartResponse",
    "WSGIApp",
    "begin",
    "content_length",
    "environ_info",
    "header_keys",
    "request_path",
]

_T = TypeVar("_T")
_time_ns = time.time_ns
Environ = dict[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

# Where the request's state waits for framework hooks (Flask's exception signal).
ENVIRON_KEY = "langfuse_mw.exchange"
HEALTH_HEADERS = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]


def header_keys(tracer: RequestTracer) -> dict[str, str]:
    """Map the environ keys of the headers the core reads (``HTTP_X_REQUEST_ID``) to names."""
    return {_environ_key(name): name for name in tracer.header_names}


@functools.cache
def _environ_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


def begin(
    tracer: RequestTracer, environ: Mapping[str, Any], keys: Mapping[str, str], method: str,
    path: str, framework: str, raw: Any,
) -> RequestState | None:  # fmt: skip
    """``tracer.begin`` for a WSGI environ (or Django's ``request.META``).

    When sampling may drop it, the decision comes first, from the few headers it needs: if
    the request is not sampled, its ``RequestInfo`` is built only when needed
    (``RequestTracer.begin_lazy``).
    """

    get = environ.get
    # The peer's address as the server gave it: a RequestInfo that is built only if the
    # request is kept is built after the app ran, and middleware inside us may have rewritten
    # the environ in place by then (werkzeug's ProxyFix sets REMOTE_ADDR from
    # X-Forwarded-For); a sampled request reads it now, and so must a kept one (client ip,
    # trusted_networks for user and session).
    info = functools.partial(
        environ_info, environ, keys, method, path, framework, raw, get("REMOTE_ADDR")
    )
    if not tracer.may_sample_out:
        return tracer.begin(info())
    return tracer.begin_lazy(
        path, get(_environ_key(tracer.request_id_header)), get("HTTP_TRACEPARENT"),
        get("HTTP_TRACESTATE"), get("HTTP_BAGGAGE"), info,
    )  # fmt: skip


def environ_info(
    environ: Mapping[str, Any], keys: Mapping[str, str], method: str, path: str,
    framework: str, raw: Any, client_ip: str | None,
) -> RequestInfo:  # fmt: skip
    """A RequestInfo from a WSGI environ (or Django's ``request.META``: the same keys);
    ``client_ip`` is REMOTE_ADDR as it was when the request arrived."""
    headers = {name: environ[key] for key, name in keys.items() if key in environ}
    query = environ.get("QUERY_STRING", "")
    return RequestInfo(method, path, query, headers, client_ip, framework, "http", raw)


def request_path(environ: Mapping[str, Any]) -> str:
    """The full path, as text: PEP 3333 servers hand over URL-decoded bytes as latin-1."""
    path: str = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    if not path.isascii():
        with contextlib.suppress(UnicodeEncodeError):  # a server that gave real text
            path = path.encode("latin-1").decode("utf-8", "replace")
    return path


class ResponseBody:
    """The response iterable the server gets: runs the app's iterator in the request's context
    and counts bytes; the observation ends when the body is complete (exhausted, or all of its
    Content-Length sent) or at ``close()``, a disconnect if the body was not complete."""

    __slots__ = (
        "closed", "exhausted", "failed", "inner_close", "iterator", "length", "obs", "on_end",
        "otel_ctx", "sendfile",
    )  # fmt: skip

    def __init__(
        self, obs: RequestState, iterable: Iterable[bytes], length: int = -1,
        on_end: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self.obs = obs
        self.on_end = on_end or obs.end
        # Iterated after the view returned and the context was reset: every next() runs with
        # the request made current again (end() drops the observation's own reference).
        self.otel_ctx = obs.otel_context
        self.inner_close: Callable[[], object] | None = getattr(iterable, "close", None)
        try:
            self.iterator: Iterator[bytes] = iter(iterable)
        except BaseException:
            if self.inner_close is not None:
                self.inner_close()  # what a server does with an iterable it cannot iterate
            raise
        self.length = length
        self.exhausted = self.failed = self.closed = False
        # The server sends the file itself (sendfile) and calls close() when it is done.
        self.sendfile = False

    def __iter__(self) -> ResponseBody:
        return self

    def __next__(self) -> bytes:
        obs = self.obs
        tokens = self.attach()  # run(next, ...), inlined: once per chunk
        try:
            chunk: bytes = next(self.iterator)
        except BaseException as exc:
            self.release(tokens)
            if isinstance(exc, StopIteration):
                self.complete()
            elif isinstance(exc, Exception):
                self.fail(exc)
            raise
        self.release(tokens)
        if not obs.ended:
            if not obs.first_byte_ns:
                obs.first_byte_ns = _time_ns()
            obs.bytes_sent += len(chunk)
        if 0 <= self.length <= obs.bytes_sent and not obs.ended:
            # Every byte announced is out: complete, even if nobody asks for the end (test
            # clients read one chunk and keep the response open).
            self.complete()
        return chunk

    def close(self) -> None:
        if self.closed:
            return  # the app's close() is called once, whoever calls ours again
        self.closed = True
        if self.sendfile:
            # Servers call close() in a finally: an OSError on its way out is the write that
            # failed (the client left); otherwise the file was sent.
            self.exhausted = not isinstance(sys.exc_info()[1], OSError)
        if not (self.exhausted or self.failed or self.obs.ended):
            # Servers close early when writing failed: the client went away (decided before
            # the app's close runs: a failure there is then not one after the response).
            self.obs.mark_disconnected()
        try:
            if self.inner_close is not None:
                self.run(self.inner_close)
        except Exception as exc:
            self.fail(exc)
            raise
        finally:
            if not self.obs.ended:
                self.finish()

    def __del__(self) -> None:
        # A server (or test client) that drops the iterable without close() still ends it.
        if not self.obs.ended:
            # The app's own close() may fail: recorded, and nobody to raise to.
            with contextlib.suppress(Exception):
                self.close()

    def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Call ``fn`` with the request current again, in the caller's own context.

        Not in a copy of the view's context: apps that set a context variable in the view and
        reset it while streaming (Flask 2.3's stream_with_context) need the caller's context."""
        tokens = self.attach()
        try:
            return fn(*args)
        finally:
            self.release(tokens)

    def attach(self) -> tuple[Any, Any]:
        """Make the request current again; give the result to ``release``."""
        otel_ctx = self.otel_ctx
        otel_token = attach_otel(otel_ctx) if otel_ctx is not None else None
        return _request_var.set(self.obs), otel_token

    def release(self, tokens: tuple[Any, Any]) -> None:
        try:
            if tokens[1] is not None:
                detach_otel(tokens[1])
            _request_var.reset(tokens[0])
        except ValueError as exc:  # the body switched contexts under us: nothing to restore
            report("wsgi.release", exc)

    def complete(self) -> None:
        self.exhausted = True
        if not self.obs.ended:  # else its Content-Length was all sent: ended already
            self.finish()

    def fail(self, exc: BaseException) -> None:
        obs = self.obs
        if self.exhausted and obs.ended and not obs.disconnected:
            # The body was complete: a close callback failed (Flask's call_on_close).
            obs.record_late_exception(exc)
            return
        self.failed = True
        obs.record_exception(exc)
        self.finish()

    def finish(self) -> None:
        self.on_end()


def content_length(value: str | None) -> int:
    """The Content-Length header as an int, -1 when absent or not a number."""
    return int(value) if value is not None and value.isdigit() else -1
