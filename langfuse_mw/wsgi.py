"""``LangfuseWSGIMiddleware``: any WSGI application; also the WSGI half of the Flask extension."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

from opentelemetry import context as otel_context

from . import runtime
from ._failsafe import report
from .config import resolve_settings
from .context import _current as _request_var
from .core import Observation, RequestInfo, RequestTracer

__all__ = ["LangfuseWSGIMiddleware"]

_T = TypeVar("_T")
Environ = dict[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

# Where the request's state waits for framework hooks (Flask's exception signal).
ENVIRON_KEY = "langfuse_mw.exchange"
HEALTH_HEADERS = [("Content-Type", "application/json"), ("Cache-Control", "no-store")]


def header_keys(tracer: RequestTracer) -> dict[str, str]:
    """Map the environ keys of the headers the core reads (``HTTP_X_REQUEST_ID``) to names."""
    return {"HTTP_" + name.upper().replace("-", "_"): name for name in tracer.header_names}


def environ_info(
    environ: Mapping[str, Any], keys: Mapping[str, str], method: str, path: str,
    framework: str, raw: Any,
) -> RequestInfo:  # fmt: skip
    """A RequestInfo from a WSGI environ (or Django's ``request.META``: the same keys)."""
    headers = {name: environ[key] for key, name in keys.items() if key in environ}
    query = environ.get("QUERY_STRING", "")
    return RequestInfo(
        method, path, query, headers, environ.get("REMOTE_ADDR"), framework, "http", raw
    )


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
        "exhausted", "failed", "inner_close", "iterator", "length", "obs", "on_end", "otel_ctx",
    )  # fmt: skip

    def __init__(
        self, obs: Observation, iterable: Iterable[bytes], length: int = -1,
        on_end: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self.obs = obs
        self.on_end = on_end or obs.end
        # Iterated after the view returned and the context was reset: every next() runs with
        # the request made current again (end() drops the observation's own reference).
        self.otel_ctx = obs.otel_context
        self.iterator: Iterator[bytes] = iter(iterable)
        self.inner_close: Callable[[], object] | None = getattr(iterable, "close", None)
        self.length = length
        self.exhausted = self.failed = False

    def __iter__(self) -> ResponseBody:
        return self

    def __next__(self) -> bytes:
        obs = self.obs
        try:
            chunk: bytes = self.run(next, self.iterator)
        except StopIteration:
            self.complete()
            raise
        except Exception as exc:
            self.fail(exc)
            raise
        obs.add_body(len(chunk))
        if 0 <= self.length <= obs.bytes_sent and not obs.ended:
            # Every byte announced is out: complete, even if nobody asks for the end (test
            # clients read one chunk and keep the response open).
            self.complete()
        return chunk

    def close(self) -> None:
        try:
            if self.inner_close is not None:
                self.run(self.inner_close)
        except Exception as exc:
            self.fail(exc)
            raise
        finally:
            if not self.obs.ended:
                if not (self.exhausted or self.failed):
                    # Servers close early when writing failed: the client went away.
                    self.obs.mark_disconnected()
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
        otel_token = otel_context.attach(otel_ctx) if otel_ctx is not None else None
        return _request_var.set(self.obs), otel_token

    def release(self, tokens: tuple[Any, Any]) -> None:
        if tokens[1] is not None:
            otel_context.detach(tokens[1])
        _request_var.reset(tokens[0])

    def complete(self) -> None:
        self.exhausted = True
        self.finish()

    def fail(self, exc: BaseException) -> None:
        self.failed = True
        self.obs.record_exception(exc)
        self.finish()

    def finish(self) -> None:
        self.on_end()


def content_length(value: str | None) -> int:
    """The Content-Length header as an int, -1 when absent or not a number."""
    return int(value) if value is not None and value.isdigit() else -1


class LangfuseWSGIMiddleware:
    """Trace every request of a WSGI app into Langfuse: ``LangfuseWSGIMiddleware(app, **options)``.

    ``route_from(environ)`` may return the matched route template (the name's second half).
    """

    framework = "wsgi"

    def __init__(
        self,
        app: WSGIApp,
        *,
        route_from: Callable[[Environ], str | None] | None = None,
        **options: Any,
    ) -> None:
        self.app = app
        self.route_from = route_from
        self.settings = resolve_settings(options)
        self.tracer = RequestTracer(self.settings)
        self.keys = header_keys(self.tracer)
        self.echo = self.settings.request_id_header if self.settings.echo_request_id else None
        runtime.get_runtime(self.settings)  # build (or warn about) the runtime at start-up

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = request_path(environ)
        tracer = self.tracer
        if path == self.settings.health_path:
            start_response("200 OK", list(HEALTH_HEADERS))
            return [tracer.health_json()]
        if tracer.is_excluded(method, path):
            return self.app(environ, start_response)
        obs = tracer.begin(environ_info(environ, self.keys, method, path, self.framework, environ))
        if obs is None:
            return self.app(environ, start_response)
        exchange = _Exchange(self, obs, environ, start_response)
        environ[ENVIRON_KEY] = exchange
        try:
            return exchange.respond(self.app(environ, exchange.start_response))
        except Exception as exc:
            exchange.fail(exc)
            raise
        except BaseException:
            exchange.finish()
            raise
        finally:
            # Framework hooks run while the app runs; dropping the key now avoids a reference
            # cycle, so the body is freed (and ended) as soon as the server lets go of it.
            environ.pop(ENVIRON_KEY, None)
            obs.detach()

    def route(self, environ: Environ) -> str | None:
        """The matched route template; called while the app answers (at ``start_response``)."""
        return self.route_from(environ) if self.route_from is not None else None


class _Exchange:
    """Per-request state between the server and the app (never on the middleware).

    Not the body itself: generator apps keep ``start_response`` in their frame, and the body
    holds the generator, so that would be a reference cycle that outlives the request."""

    __slots__ = ("environ", "length", "mw", "noted", "obs", "server_start", "server_write")

    def __init__(
        self, mw: LangfuseWSGIMiddleware, obs: Observation, environ: Environ,
        start_response: StartResponse,
    ) -> None:  # fmt: skip
        self.obs, self.mw, self.environ = obs, mw, environ
        self.server_start = start_response
        self.server_write: Callable[[bytes], object] | None = None
        self.noted: BaseException | None = None
        self.length = -1

    def respond(self, result: Iterable[bytes]) -> Iterable[bytes]:
        wrapper = self.environ.get("wsgi.file_wrapper")
        if isinstance(wrapper, type) and isinstance(result, wrapper):
            # The server sends its own file wrapper with sendfile(): hand it back and hear about
            # the end from its close(), which servers call once the file is sent.
            body = ResponseBody(self.obs, (), self.length, self.finish)
            try:
                body.inner_close = getattr(result, "close", None)
                result.close = body.close  # type: ignore[attr-defined]
            except AttributeError:
                pass
            else:
                body.exhausted = True
                if self.length > 0:
                    self.obs.add_body(self.length)
                return result
        return ResponseBody(self.obs, result, self.length, self.finish)

    def fail(self, exc: BaseException) -> None:
        self.obs.record_exception(exc)
        self.finish()

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        obs = self.obs
        try:
            obs.set_status(int(status[:3]))
            if exc_info is not None:
                self.note(exc_info[1])  # an error page replacing the response
            self.capture_route()
            echo, has_echo = self.mw.echo, False
            for name, value in headers:
                lower = name.lower()
                if lower == echo:
                    has_echo = True  # the application set its own: it wins
                elif lower == "content-length":
                    self.length = content_length(value)
            if echo is not None and not has_echo:
                # A new list: the application may reuse its own.
                headers = [*headers, (echo, obs.request_id)]
        except Exception as exc:
            report("wsgi.start_response", exc)
        if exc_info is None:
            self.server_write = self.server_start(status, headers)
        else:
            self.server_write = self.server_start(status, headers, exc_info)
        return self.write

    def write(self, data: bytes) -> object:
        # The legacy write() callable of PEP 3333.
        assert self.server_write is not None
        self.obs.add_body(len(data))
        try:
            return self.server_write(data)
        except OSError:
            self.obs.mark_disconnected()
            raise

    def capture_route(self) -> None:
        try:
            self.obs.set_route(self.mw.route(self.environ))
        except Exception as exc:
            report("wsgi.route", exc)

    def note(self, exc: BaseException) -> None:
        """An exception the framework handled; recorded if its response is a 5xx."""
        if self.noted is None:
            self.noted = exc
        if self.obs.route is None:
            self.capture_route()

    def finish(self) -> None:
        obs = self.obs
        if obs.ended:
            return
        if obs.route is None:
            self.capture_route()
        if self.noted is not None and (obs.status or 500) >= 500:
            obs.record_exception(self.noted)
        self.noted = None
        obs.end()


def note_exception(environ: Mapping[str, Any], exc: BaseException) -> None:
    """Tell the request's observation about an exception the framework turned into a response."""
    exchange = environ.get(ENVIRON_KEY)
    if isinstance(exchange, _Exchange):
        exchange.note(exc)
